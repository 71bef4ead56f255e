"""Put a suite's data where EvalScope reads it: one ``{subset}_{split}.jsonl`` per subset, media paths absolute.

EvalScope opens media paths relative to the process's working directory, so committed files name
their media relative to themselves and are rewritten here, into the run folder, with absolute
paths (every one checked to exist first: a missing file is a clear error, not a failed request per
item). EvalScope then inlines each file as base64, which is what a remote server needs anyway.
The item limit is applied here too, so the totals the progress display shows are exact.

Generated suites (``omni-synth``) are written once into omniserve's eval cache by the training
issue's generator and reused; the folder name carries the generator's parameters and a digest of
its source, so a changed generator never reuses stale files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.eval.errors import DatasetMissing, InvalidSuite
from omniserve.eval.suites import Suite

#: EvalScope benchmark registered by ``evalscope_ext`` for exact-match scoring of messages.
EXACT_BENCHMARK = "omniserve_exact_vqa"
#: The name ``tools`` suites report as their benchmark: scored by ``eval/tools_suite.py``, not EvalScope.
TOOLS_BENCHMARK = "omniserve_tool_calls"
#: The name ``asr`` suites report: uploads to /v1/audio/transcriptions, scored by ``eval/asr_suite.py``.
ASR_BENCHMARK = "omniserve_transcriptions"
#: Bumped when the layout of generated data changes, so stale cache entries are not reused.
GENERATED_FORMAT = "2"  # 2: items keep their line's tools and response_format
_URL_PARTS = ("image_url", "video_url")
_MEDIA_KEYS = ("image", "video", "audio")


@dataclass(frozen=True)
class StagedSuite:
    """What the EvalScope worker needs for one suite, and the item counts the progress display needs."""

    suite: Suite
    benchmark: str
    local_path: Path
    totals: dict[str, int]
    dataset_args: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.totals.values())


def stage_suite(suite: Suite, dest: Path, *, limit: int | None, cache_dir: Path) -> StagedSuite:
    """Write the suite's items (at most ``limit`` per subset) under ``dest``; raise ``DatasetMissing`` early."""
    source = _source_dir(suite, cache_dir)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    limit = limit if limit is not None else suite.limit
    exact_messages = suite.scoring == "exact"
    totals: dict[str, int] = {}
    for subset in suite.subsets:
        file = source / f"{subset}_{suite.split}.jsonl"
        if not file.is_file():
            raise DatasetMissing(f"suite {suite.name!r}: data file {file} is missing (subset {subset!r})")
        rows = _read_jsonl(file, limit)
        if not rows:
            raise DatasetMissing(f"suite {suite.name!r}: {file} holds no items")
        staged = [_absolute(suite, row, file) for row in rows]
        if exact_messages and suite.format == "qa":
            staged = [
                {"messages": [{"role": "user", "content": row["question"]}], "answer": row["answer"]} for row in staged
            ]
        # the exact-match benchmark reads the test split like general_vqa
        out_name = f"{subset}_test.jsonl" if exact_messages else file.name
        (dest / out_name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in staged), "utf-8")
        totals[subset] = len(staged)
    benchmark, dataset_args = _benchmark(suite)
    return StagedSuite(suite=suite, benchmark=benchmark, local_path=dest, totals=totals, dataset_args=dataset_args)


def _benchmark(suite: Suite) -> tuple[str, dict[str, Any]]:
    """The EvalScope benchmark and the ``dataset_args`` entries other than paths and subsets."""
    if suite.scoring == "exact":
        return EXACT_BENCHMARK, {}
    if suite.format == "tools":
        return TOOLS_BENCHMARK, {}
    if suite.format == "asr":
        return ASR_BENCHMARK, {}
    if suite.format == "mcq":
        return "general_mcq", {"prompt_template": "english-single-answer"}
    if suite.format == "vmcq":
        return "general_vmcq", {"prompt_template": "english-single-answer"}
    metrics = list(suite.metrics or ["Rouge"])
    if suite.format == "qa":  # general_qa's default prompt prefixes a Chinese instruction
        return "general_qa", {"metric_list": metrics, "prompt_template": "{question}"}
    return "general_vqa", {"metric_list": metrics}


def _source_dir(suite: Suite, cache_dir: Path) -> Path:
    if suite.generate is None:
        folder = suite.data_dir()
        assert folder is not None
        if not folder.is_dir():
            raise DatasetMissing(f"suite {suite.name!r}: data folder {folder} does not exist")
        return folder
    return _generated_omni_synth(suite, Path(cache_dir))


def _generated_omni_synth(suite: Suite, cache_dir: Path) -> Path:
    """The synthetic test split as ``{task}_test.jsonl`` files (generated once, then cached)."""
    from omniserve.synth import TASKS, write_synthetic
    from omniserve.synth.speech_audio import SpeechSynthesizerMissing

    spec = suite.generate
    assert spec is not None
    unknown = [s for s in suite.subsets if s not in TASKS]
    if unknown:
        raise InvalidSuite(
            f"suite {suite.name!r}: omni-synth has no task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}"
        )
    name = f"omni-synth-f{GENERATED_FORMAT}-seed{spec.seed}-n{spec.per_task}-{generator_fingerprint(suite)[:12]}"
    entry = cache_dir / "data" / name
    if (entry / "done").is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".omni-synth-", dir=entry.parent))
    try:
        # the suite's tasks only: a suite without the spoken task needs no speech synthesiser
        write_synthetic(
            scratch / "raw", seed=spec.seed, train_size=0, test_size=spec.per_task, tasks=tuple(suite.subsets)
        )
        by_task: dict[str, list[str]] = {}
        for line in (scratch / "raw" / "test.jsonl").read_text("utf-8").splitlines():
            record = json.loads(line)
            # the request is the conversation without its final (assistant) answer
            item = {"id": record["id"], "messages": record["messages"][:-1], "answer": record["answer"]}
            item.update({k: record[k] for k in ("tools", "response_format") if k in record})
            item = {**item, "messages": _relative_media(item["messages"], "raw/")}
            by_task.setdefault(record["task"], []).append(json.dumps(item, ensure_ascii=False))
        for task, lines in by_task.items():
            (scratch / f"{task}_test.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
        (scratch / "done").write_text("ok\n")
        try:
            scratch.rename(entry)
        except OSError:  # another run published the same entry first
            if not (entry / "done").is_file():
                raise
    except SpeechSynthesizerMissing as exc:
        raise DatasetMissing(f"suite {suite.name!r} cannot be generated: {exc}") from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return entry


def generator_fingerprint(suite: Suite) -> str:
    """Digest of the generator's source: the same seed gives other bytes once the generator changes."""
    import omniserve.synth

    generated = {**suite.generate.model_dump(), "tasks": suite.subsets} if suite.generate else None
    digest = hashlib.sha256(json.dumps(generated).encode())
    for file in sorted(Path(omniserve.synth.__file__).parent.glob("*.py")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _relative_media(messages: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Media paths made relative to the JSONL file; the synthetic ``audio_url`` becomes OpenAI's ``input_audio``."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in _URL_PARTS:
                    part = {"type": kind, kind: {"url": prefix + part[kind]["url"]}}
                elif kind == "audio_url":
                    path = prefix + part["audio_url"]["url"]
                    part = {"type": "input_audio", "input_audio": {"data": path, "format": Path(path).suffix[1:]}}
                parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out


def _read_jsonl(file: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(file.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetMissing(f"{file}:{number} is not valid JSON: {exc}") from None
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _absolute(suite: Suite, row: dict[str, Any], file: Path) -> dict[str, Any]:
    """The row with every local media path made absolute (and checked), data/http URLs left alone."""
    base = file.parent
    if suite.format == "vmcq":
        row = dict(row)
        for key, value in row.items():
            if isinstance(value, str) and key.split("_")[0] in _MEDIA_KEYS and key.split("_")[-1].isdigit():
                row[key] = _local(value, base, suite, file)
        return row
    if suite.format in ("vqa", "tools", "asr"):
        messages = []
        for message in row.get("messages", []):
            content = message.get("content")
            if isinstance(content, list):
                content = [_absolute_part(part, base, suite, file) for part in content]
            messages.append({**message, "content": content})
        return {**row, "messages": messages}
    return row


def _absolute_part(part: dict[str, Any], base: Path, suite: Suite, file: Path) -> dict[str, Any]:
    kind = part.get("type")
    if kind in _URL_PARTS:
        holder = part[kind]
        url = holder if isinstance(holder, str) else holder["url"]
        return {"type": kind, kind: {"url": _local(url, base, suite, file)}}
    if kind == "input_audio":
        audio = part["input_audio"]
        return {"type": kind, "input_audio": {**audio, "data": _local(audio["data"], base, suite, file)}}
    return part


def _local(value: str, base: Path, suite: Suite, file: Path) -> str:
    if value.startswith(("data:", "http://", "https://")) or len(value) > 4096:  # URLs and inline base64
        return value
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise DatasetMissing(f"suite {suite.name!r}: {file} names media {value!r}, but {path} does not exist")
    return str(path.resolve())
