"""``omniserve eval``: score a model on suites through EvalScope, one suite per worker process.

Order matters for the user's time: every suite is loaded, validated and staged (data checked)
before a server is started, so a typo or a missing file fails in a second, not after a model load.
While a suite runs, the runner watches two things: the items EvalScope has reviewed (for the
progress display) and the server (a dead server stops the run at once; what was scored is kept
and the suite is marked incomplete, later suites ``not-run``).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path

from pydantic import Field

from omniserve.eval.datasets import StagedSuite, stage_suite
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import RunReport, SampleCounts, SuiteResult
from omniserve.eval.results import SAMPLE_METRIC, answered, collect, review_lines, running_score
from omniserve.eval.standard import StagedStandard, check_modalities, is_standard, media_body, stage_standards
from omniserve.eval.suites import load_suite
from omniserve.eval.target import SECRETS, Target, TargetOptions, connect
from omniserve.eval.worker import Worker, require_eval_extra, required_cache_dir

_POLL_SECONDS = 0.5
_HEALTH_EVERY = 2.0
#: After the server is gone, EvalScope fails the remaining items at once and writes its report for the
#: items answered before; this is how long it gets to do so before it is stopped.
_WRAP_UP_SECONDS = 30.0


class EvalOptions(TargetOptions):
    """Everything one ``omniserve eval`` run needs; built from CLI flags (or by the quality gate)."""

    suites: list[str] = Field(
        min_length=1,
        description="Suite name (see eval/) or suite YAML file.",
        json_schema_extra={"flag": "suite", "csv": True},
    )
    output: Path | None = Field(None, description="Run folder. Default: ./omniserve-eval/<model>-<time>.")
    limit: int | None = Field(None, ge=1, description="Items per subset (default: the suite's own, else all).")
    cache_dir: Path | None = Field(
        None, description="Eval cache (generated data, EvalScope/HF caches). Default: ~/.cache/omniserve/eval."
    )
    concurrency: int = Field(4, ge=1, le=256, description="Requests EvalScope keeps in flight.")
    request_timeout: float = Field(300, gt=0, description="Seconds per request.")
    progress: bool = Field(True, description="Show live progress.")
    dataset_dir: Path | None = Field(
        None, description="Standard benchmarks (evalscope:NAME): folder holding NAME/, a copy of its published files."
    )
    allow_download: bool = Field(
        False, description="Standard benchmarks without --dataset-dir: let EvalScope download them into --cache-dir."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=32768, description="Standard benchmarks: reply length limit (default 1024)."
    )
    media_fps: float | None = Field(
        None, gt=0, description="Standard benchmarks: frames per second sampled from videos."
    )
    media_max_frames: int | None = Field(None, ge=1, description="Standard benchmarks: most frames taken from a video.")
    media_max_pixels: int | None = Field(None, ge=1, description="Standard benchmarks: most pixels per image or frame.")


def run_evaluation(options: EvalOptions, *, progress: SuiteProgress | None = None) -> RunReport:
    """Run every suite and write ``report.json`` / ``report.md`` into the run folder; return the report."""
    require_eval_extra()
    suites = {ref: None if is_standard(ref) else load_suite(ref) for ref in options.suites}
    cache_dir = required_cache_dir(options.cache_dir)
    # absolute: the paths in a job reach EvalScope's children, which run in folders of their own
    output = (options.output or _default_output(options)).resolve()
    output.mkdir(parents=True, exist_ok=True)
    refs = [ref for ref, suite in suites.items() if suite is None]
    standard = stage_standards(
        refs,
        dataset_dir=options.dataset_dir,
        allow_download=options.allow_download,
        limit=options.limit,
        max_tokens=options.max_tokens,
        cache_dir=cache_dir,
        folder=output / "data" / "evalscope",
    ) if refs else []  # fmt: skip
    by_ref = dict(zip(refs, standard, strict=True))
    staged: list[StagedSuite | StagedStandard] = [
        by_ref[ref]
        if suite is None
        else stage_suite(suite, output / "data" / suite.name, limit=options.limit, cache_dir=cache_dir)
        for ref, suite in suites.items()
    ]
    target = connect(options, log_file=output / "server.log")
    report = RunReport(target=target.identity, options=_recorded_options(options, output))
    progress = progress or SuiteProgress(enabled=False)
    try:
        if standard:  # a benchmark whose media the model does not take: refused before any suite runs
            check_modalities(target.base_url, target.model, target.api_key, standard)
        with progress:
            for item in staged:
                gone = target.problem()
                if gone is not None:
                    report.suites[item.suite.name] = _not_run(item, gone)
                    continue
                report.suites[item.suite.name] = _run_suite(item, target, options, output, cache_dir, progress)
    finally:
        target.close()
    report.complete = all(r.status == "complete" for r in report.suites.values())
    report.write(output)
    return report


def _run_suite(
    staged: StagedSuite | StagedStandard,
    target: Target,
    options: EvalOptions,
    output: Path,
    cache_dir: Path,
    progress: SuiteProgress,
) -> SuiteResult:
    if staged.suite.format == "tools":  # tools and response_format: sent and scored by omniserve, not EvalScope
        from omniserve.eval.tools_suite import run_tools_suite

        assert isinstance(staged, StagedSuite)
        return run_tools_suite(
            staged, target, concurrency=options.concurrency, request_timeout=options.request_timeout, progress=progress
        )
    if staged.suite.format == "asr":  # uploads to /v1/audio/transcriptions, scored by word error rate
        from omniserve.eval.asr_suite import run_asr_suite

        assert isinstance(staged, StagedSuite)
        return run_asr_suite(
            staged, target, concurrency=options.concurrency, request_timeout=options.request_timeout, progress=progress
        )
    folder = output / "evalscope" / _folder(staged.suite.name)
    if folder.exists():  # reviews of an earlier run in the same folder would mix into the partial score
        shutil.rmtree(folder)
    work_dir = folder / "work"
    job = {
        "kind": "eval",
        "model": target.model,
        "api_url": target.base_url,
        "benchmark": staged.benchmark,
        "dataset_args": staged.dataset_args,
        "local_path": str(staged.local_path),
        "subsets": list(staged.totals),
        "max_tokens": staged.suite.generation.max_tokens,
        "temperature": staged.suite.generation.temperature,
        "request_timeout": options.request_timeout,
        "concurrency": options.concurrency,
        "work_dir": str(work_dir),
    }
    media = media_body(options.media_fps, options.media_max_frames, options.media_max_pixels)
    if isinstance(staged, StagedStandard):
        job = staged.job(job, media, cache_dir)
    task = progress.add(staged.suite.name, staged.total)
    started = time.monotonic()
    offline = not (isinstance(staged, StagedStandard) and staged.local_path is None)
    worker = Worker.start(job, folder=folder, cache_dir=cache_dir, api_key=target.api_key, offline=offline)
    stopped: str | None = None
    next_check = started + _HEALTH_EVERY
    wrap_up_until = float("inf")
    try:
        while worker.poll() is None:
            time.sleep(_POLL_SECONDS)
            _, score = running_score(review_lines(work_dir, staged), staged.suite.scoring)
            progress.update(task, answered(work_dir, staged), score)
            now = time.monotonic()
            if stopped is None and now >= next_check:
                next_check = now + _HEALTH_EVERY
                stopped = target.problem()
                if stopped is not None:
                    wrap_up_until = now + _WRAP_UP_SECONDS
            if now > wrap_up_until:
                worker.stop()
                break
    except BaseException:  # Ctrl-C: do not leave EvalScope running against the server
        worker.stop()
        raise
    exit_code = worker.poll()
    if stopped is None and _failed_items(work_dir, staged):
        stopped = _confirm_gone(target)  # items failed because the server went away mid-suite?
    result = collect(
        staged,
        work_dir,
        exit_code=exit_code,
        stopped=stopped,
        seconds=time.monotonic() - started,
        log_tail=worker.log_tail(),
    )
    if isinstance(staged, StagedStandard):  # items, EvalScope version, data hashes, media options: reproducible
        result.standard = {**staged.details, "media": media}
    progress.update(task, result.samples.scored, result.score)
    progress.finish(task, result.status, result.score)
    return result


def _failed_items(work_dir: Path, staged: StagedSuite) -> bool:
    done, _ = running_score(review_lines(work_dir, staged), staged.suite.scoring)
    return done < staged.total


def _confirm_gone(target: Target) -> str | None:
    for _ in range(2):
        reason = target.problem()
        if reason is not None:
            return reason
        time.sleep(0.5)
    return None


def _not_run(staged: StagedSuite | StagedStandard, reason: str) -> SuiteResult:
    scoring = staged.suite.scoring
    return SuiteResult.of(
        staged,
        metric=SAMPLE_METRIC.get(scoring, scoring),
        status="not-run",
        samples=SampleCounts(requested=staged.total),
        errors=[f"not run: {reason}"],
    )


def _folder(name: str) -> str:
    """A suite's folder name: ``evalscope:mmlu`` -> ``evalscope-mmlu`` (no ':' in paths)."""
    return name.replace(":", "-")


def _default_output(options: EvalOptions) -> Path:
    server = options.server
    name = server.model.name if server is not None and server.model is not None else "url"
    if server is not None and server.quant:
        name += f"-{server.quant}"
    return Path("omniserve-eval") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _recorded_options(options: EvalOptions, output: Path) -> dict[str, object]:
    data = options.model_dump(mode="json", exclude=SECRETS)
    data["output"] = str(output)
    return data
