"""``omniserve bench``: EvalScope's perf tool at several concurrency levels, summarised and charted.

EvalScope measures (TTFT, TPOT, ITL, latency, throughput and their percentiles, one run per
level); omniserve picks the server (started for the run or given by ``--url``), supplies local
request data and a local tokenizer only, and turns EvalScope's per-level JSON files into one
``bench.json``, a Markdown table and ``bench.png`` (throughput and latency against concurrency).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from omniserve.atomic_files import write_text_atomic, write_with
from omniserve.eval.bench_data import Media, inspect_file, write_synthetic
from omniserve.eval.errors import BenchError
from omniserve.eval.html_report import write_bench_html
from omniserve.eval.report import library_versions
from omniserve.eval.target import TargetOptions, connect
from omniserve.eval.worker import Worker, require_eval_extra, required_cache_dir


class BenchOptions(TargetOptions):
    """Everything one ``omniserve bench`` run needs; its flags are these fields."""

    concurrency: list[int] = Field(
        default_factory=lambda: [1, 4, 16],
        min_length=1,
        description="Concurrency levels (default 1,4,16).",
        json_schema_extra={"csv": True},
    )
    requests: int = Field(32, ge=1, description="Requests per concurrency level.")
    dataset: str = Field(
        "synthetic", description="synthetic (generated prompts) or a JSONL FILE: lines with 'question' or 'messages'."
    )
    media: Media = Field(
        "none", description="With --dataset synthetic: media in every request (video: an MP4 clip as video_url)."
    )
    images: int = Field(
        1, ge=1, le=32, description="With --media image or image+audio: distinct images per request (multi-image load)."
    )
    video_frames: int = Field(
        8, ge=1, le=1024, description="With --media video: frames in each request's clip (64x64, 2 fps)."
    )
    stream: bool = Field(True, description="Stream replies (needed for TTFT/ITL).")
    max_tokens: int = Field(64, ge=1, description="Tokens generated per request.")
    ignore_eos: bool = Field(
        True,
        description="Generate exactly --max-tokens per reply (sends ignore_eos, as vLLM/SGLang accept), so figures "
        "do not depend on when a model happens to stop; --no-ignore-eos for servers that refuse the field.",
    )
    output: Path | None = Field(None, description="Folder for bench.json/.md/.png. Default: ./omniserve-bench/<time>.")
    tokenizer: Path | None = Field(
        None, description="Local tokenizer folder for token counts (default: --model's; never a hub id)."
    )
    cache_dir: Path | None = Field(
        None, description="Eval cache (EvalScope/HF caches). Default: ~/.cache/omniserve/eval."
    )
    request_timeout: int = Field(300, ge=1, description="Seconds per request.")
    request_rate: list[float] | None = Field(
        None,
        description="Open loop instead of --concurrency: requests/s levels (Poisson arrivals, concurrency unbounded).",
        json_schema_extra={"csv": True},
    )
    audio_output: Literal["none", "chat", "speech"] = Field(
        "none",
        description="Measure spoken replies instead of text (omniserve/eval/bench_audio.py): chat (chat completions "
        "with audio output, streamed pcm16) or speech (/v1/audio/speech, streamed pcm); reports time to first audio "
        "byte and the real-time factor per concurrency level.",
    )
    voice: str | None = Field(None, description="With --audio-output: the voice (default: the server's first).")
    audio_sample_rate: int = Field(
        24_000, gt=0, description="With --audio-output: the rate of the pcm the server sends (24 kHz for Qwen2.5-Omni)."
    )
    slo_ttft_ms: float | None = Field(
        None,
        gt=0,
        description="With --request-rate: stop at the first rate whose TTFT p99 exceeds this many ms; "
        "report the highest rate that held.",
    )

    @model_validator(mode="after")
    def _valid(self) -> BenchOptions:
        if any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency levels must be >= 1")
        if self.request_rate is not None and any(not (math.isfinite(r) and r > 0) for r in self.request_rate):
            raise ValueError("--request-rate levels must be numbers > 0 (requests per second)")
        if self.slo_ttft_ms is not None and (self.request_rate is None or not self.stream):
            raise ValueError("--slo-ttft-ms sweeps --request-rate levels and needs --stream (TTFT)")
        if self.media != "none" and self.dataset != "synthetic":
            raise ValueError("--media applies to --dataset synthetic; put media in your file's messages instead")
        if self.images > 1 and "image" not in self.media:
            raise ValueError("--images applies to --media image or image+audio")
        if "video_frames" in self.model_fields_set and self.media != "video":
            raise ValueError("--video-frames applies to --media video")
        audio_only = {"voice", "audio_sample_rate"} & self.model_fields_set
        if self.audio_output == "none" and audio_only:
            raise ValueError("--voice and --audio-sample-rate apply to --audio-output chat or speech")
        text_only = self.request_rate is not None or self.media != "none" or self.dataset != "synthetic"
        if self.audio_output != "none" and (text_only or not self.stream):
            raise ValueError("--audio-output streams its own text requests at --concurrency levels: no "
                             "--request-rate, --media, --dataset FILE or --no-stream")  # fmt: skip
        return self


class Stats(BaseModel):
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class LevelResult(BaseModel):
    concurrency: int  # -1: open loop (unbounded), as EvalScope writes it
    rate: float | None = Field(None, description="Open loop: the requests/s the arrivals were scheduled at.")
    requests: int
    succeeded: int
    failed: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    avg_input_tokens: float | None = None
    avg_output_tokens: float | None = None
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    latency_s: Stats


class ReportRecord(BaseModel):
    """What every bench report (text or audio) records beside its levels: when, against what, with which options
    and library versions, so a bench.json read months later says how it was made. ``folder`` is where its files
    are written, not part of them."""

    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    target: dict[str, Any]
    options: dict[str, Any]
    versions: dict[str, str | None] = Field(default_factory=library_versions)
    folder: Path = Field(exclude=True)


class BenchReport(ReportRecord):
    levels: list[LevelResult]
    slo: dict[str, Any] | None = Field(
        None, description="--slo-ttft-ms: the target, the highest rate whose TTFT p99 held, the rate that broke it."
    )

    def markdown(self) -> str:
        open_loop = any(r.rate is not None for r in self.levels)
        lines = [
            f"Benchmark of {self.target.get('model')} ({'stream' if self.options.get('stream') else 'no stream'}, "
            f"{'' if self.options.get('ignore_eos') else 'up to '}{self.options.get('max_tokens')} tokens out, "
            f"dataset {self.options.get('dataset')}"
            f"{_media(self.options)})",
            "",
            f"| {'rate' if open_loop else 'concurrency'} | ok/failed | req/s | out tok/s | TTFT ms mean/p50/p99 "
            "| TPOT ms mean/p50/p99 | ITL ms mean/p50/p99 | latency s p50/p99 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.levels:
            lines.append(
                f"| {_load(r)} | {r.succeeded}/{r.failed} | {r.requests_per_s:.2f} | {r.output_tokens_per_s:.1f} "
                f"| {_three(r.ttft_ms)} | {_three(r.tpot_ms)} | {_three(r.itl_ms)} "
                f"| {_fmt(r.latency_s.p50, 3)}/{_fmt(r.latency_s.p99, 3)} |"
            )
        if self.slo is not None:
            held = self.slo.get("highest_rate_held")
            lines += [
                "",
                f"TTFT p99 target {self.slo['ttft_p99_ms']:g} ms: highest rate that held "
                + (f"{held:g} req/s" if held is not None else "none (the lowest rate already exceeded it)")
                + (f"; exceeded at {self.slo['exceeded_at']:g} req/s" if self.slo.get("exceeded_at") else ""),
            ]
        return "\n".join(lines) + "\n"


def run_bench(options: BenchOptions) -> BenchReport:
    """Run every level, write bench.json / .md / .png / .html; raise ``BenchError`` if a level has no result."""
    require_eval_extra(charts=True)
    cache_dir = required_cache_dir(options.cache_dir)
    folder = options.output or Path("omniserve-bench") / datetime.now().strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    if options.audio_output != "none":
        from omniserve.eval.bench_audio import run_audio_bench

        target = connect(options, log_file=folder / "server.log")
        try:
            return run_audio_bench(options, target, folder)  # type: ignore[return-value]  # same folder/markdown
        finally:
            target.close()
    count = options.requests
    if options.dataset == "synthetic":
        data_file = folder / "requests.jsonl"
        dataset = write_synthetic(
            data_file, count, options.media, images=options.images, video_frames=options.video_frames
        )
    else:
        data_file = Path(options.dataset).expanduser().resolve()
        dataset = inspect_file(data_file)
    target = connect(options, log_file=folder / "server.log")
    try:
        served = options.server.model if options.server is not None else None
        tokenizer = options.tokenizer or served
        arguments = {
            "model": target.model,
            "url": f"{target.base_url}/chat/completions",
            "api": "openai",
            "dataset": dataset,
            "dataset_path": str(data_file),
            "tokenizer_path": str(tokenizer) if tokenizer is not None else None,
            "parallel": options.concurrency,
            "number": [count] * len(options.concurrency),
            "stream": options.stream,
            "max_tokens": options.max_tokens,
            "extra_args": {"ignore_eos": True} if options.ignore_eos else None,
            "temperature": 0.0,
            "seed": 0,
            "sleep_interval": 0,
            "read_timeout": options.request_timeout,
            "outputs_dir": str(folder / "evalscope"),
            "no_timestamp": True,
        }
        slo = None
        if options.request_rate is not None:
            levels, slo = _open_loop(options, arguments, folder, cache_dir, target)
        else:
            job = {"kind": "perf", "arguments": arguments}
            worker = Worker.start(job, folder=folder / "worker", cache_dir=cache_dir, api_key=target.api_key)
            code = worker.wait()
            gone = target.problem()
            levels = [
                _level(folder / "evalscope", c, count, code, worker.log_tail(), gone) for c in options.concurrency
            ]
    finally:
        target.close()
    recorded = options.model_dump(mode="json", exclude={"api_key"})
    report = BenchReport(target=target.identity, options=recorded, levels=levels, slo=slo, folder=folder)
    write_reports(report)
    return report


def write_reports(report: BenchReport) -> None:
    """bench.json, bench.md, bench.png and bench.html (the table and the chart, for a browser) in its folder."""
    folder = report.folder
    write_text_atomic(folder / "bench.json", report.model_dump_json(indent=2) + "\n")
    write_text_atomic(folder / "bench.md", report.markdown())
    _chart(report, folder / "bench.png")
    write_bench_html(report, folder / "bench.png", folder / "bench.html")


def _open_loop(
    options: BenchOptions, arguments: dict[str, Any], folder: Path, cache_dir: Path, target: Any
) -> tuple[list[LevelResult], dict[str, Any] | None]:
    """One EvalScope open-loop run per rate, lowest first; with an SLO, stop at the first rate that breaks it.

    One process per rate (rather than EvalScope's own rate list) so the sweep can stop as soon as a
    rate misses the target instead of loading the server with every higher rate too.
    """
    levels: list[LevelResult] = []
    held: float | None = None
    exceeded: float | None = None
    for rate in sorted(options.request_rate or []):
        run = folder / "evalscope" / f"rate-{rate:g}"
        job = {
            "kind": "perf",
            "arguments": {**arguments, "open_loop": True, "rate": [rate], "number": [options.requests],
                          "parallel": [1], "outputs_dir": str(run)},
        }  # fmt: skip
        worker = Worker.start(job, folder=folder / f"worker-rate-{rate:g}", cache_dir=cache_dir, api_key=target.api_key)
        code = worker.wait()
        level = _level(run, -1, options.requests, code, worker.log_tail(), target.problem(), rate=rate)
        levels.append(level)
        if options.slo_ttft_ms is None:
            continue
        p99 = level.ttft_ms.p99
        if level.failed == 0 and p99 is not None and p99 <= options.slo_ttft_ms:
            held = rate
        else:
            exceeded = rate
            break
    slo = None
    if options.slo_ttft_ms is not None:
        slo = {"ttft_p99_ms": options.slo_ttft_ms, "highest_rate_held": held, "exceeded_at": exceeded}
    return levels, slo


def _media(options: dict[str, Any]) -> str:
    """The load's media for the table's title: ``, media image x3 images`` or ``, media video (8 frames)``."""
    media = options.get("media", "none")
    if media == "none":
        return ""
    if media == "video":
        return f", media video ({options.get('video_frames')} frames)"
    images = options.get("images") or 1
    return f", media {media}" + (f" x{images} images" if images > 1 else "")


def _load(level: LevelResult) -> str:
    """The load column: a concurrency level, or an open-loop rate."""
    return f"{level.rate:g} req/s" if level.rate is not None else str(level.concurrency)


def _level(
    root: Path, concurrency: int, count: int, code: int, log_tail: str, gone: str | None, *, rate: float | None = None
) -> LevelResult:
    pattern = f"**/rate_*_number_{count}" if rate is not None else f"**/parallel_{concurrency}_number_{count}"
    found = next(root.glob(f"{pattern}/benchmark_summary.json"), None)
    if found is None:
        why = gone or f"EvalScope perf exited with code {code}"
        what = f"rate {rate:g} req/s" if rate is not None else f"concurrency {concurrency}"
        raise BenchError(f"no result for {what}: {why}\n{log_tail}")
    summary = json.loads(found.read_text("utf-8"))
    percentiles = json.loads((found.parent / "benchmark_percentile.json").read_text("utf-8"))
    rows = {row["Percentiles"]: row for row in percentiles}

    def stats(summary_key: str, column: str) -> Stats:
        return Stats(
            mean=_finite(summary.get(summary_key)),
            p50=_finite(rows.get("50%", {}).get(column)),
            p90=_finite(rows.get("90%", {}).get(column)),
            p99=_finite(rows.get("99%", {}).get(column)),
        )

    return LevelResult(
        concurrency=concurrency,
        rate=rate,
        requests=int(summary.get("Total Requests", count)),
        succeeded=int(summary.get("Success Requests", 0)),
        failed=int(summary.get("Failed Requests", 0)),
        seconds=float(summary.get("Test Duration (s)", 0.0)),
        requests_per_s=float(summary.get("Req Throughput (req/s)", 0.0)),
        output_tokens_per_s=float(summary.get("Output Throughput (tok/s)", 0.0)),
        total_tokens_per_s=float(summary.get("Total Throughput (tok/s)", 0.0)),
        avg_input_tokens=summary.get("Avg Input Tokens"),
        avg_output_tokens=summary.get("Avg Output Tokens"),
        ttft_ms=stats("Avg TTFT (ms)", "TTFT (ms)"),
        tpot_ms=stats("Avg TPOT (ms)", "TPOT (ms)"),
        itl_ms=stats("Avg ITL (ms)", "ITL (ms)"),
        latency_s=stats("Avg Latency (s)", "Latency (s)"),
    )


def _chart(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    open_loop = any(r.rate is not None for r in report.levels)
    xs = [r.rate if r.rate is not None else r.concurrency for r in report.levels]
    x_label = "requests/s (open loop)" if open_loop else "concurrency"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(xs, [r.output_tokens_per_s for r in report.levels], "o-", label="output tok/s")
    left.set_xlabel(x_label)
    left.set_ylabel("output tokens/s")
    twin = left.twinx()
    twin.plot(xs, [r.requests_per_s for r in report.levels], "s--", color="tab:orange", label="req/s")
    twin.set_ylabel("requests/s")
    left.set_title("Throughput")
    left.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    for name, pick in (
        ("TTFT p50", lambda r: r.ttft_ms.p50),
        ("TTFT p99", lambda r: r.ttft_ms.p99),
        ("TPOT p50", lambda r: r.tpot_ms.p50),
        ("ITL p50", lambda r: r.itl_ms.p50),
    ):
        values = [pick(r) for r in report.levels]
        if any(v is not None for v in values):
            right.plot(xs, [float("nan") if v is None else v for v in values], "o-", label=name)
    right.set_xlabel(x_label)
    right.set_ylabel("milliseconds")
    right.set_title("Latency")
    right.legend(fontsize=8)
    save_chart(fig, (left, right), xs, f"omniserve bench: {report.target.get('model')}", path)


def save_chart(fig: Any, axes: tuple[Any, ...], xs: list[float], title: str, path: Path) -> None:
    """Finish a bench chart (text or audio) and write it to ``path``: ``axes`` on a log-2 x scale ticked at the
    levels measured (1, 4, 16 stay evenly apart and labelled as given), the title above, the figure closed."""
    import matplotlib.pyplot as plt

    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [f"{x:g}" for x in xs])
    fig.suptitle(title)
    fig.tight_layout()
    write_with(path, lambda staging: fig.savefig(staging, dpi=110, format="png"))
    plt.close(fig)


def _finite(value: object) -> float | None:
    """EvalScope writes NaN where a statistic has no data (e.g. ITL of one-token replies): shown as '-'."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _three(s: Stats) -> str:
    return f"{_fmt(s.mean)}/{_fmt(s.p50)}/{_fmt(s.p99)}"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
