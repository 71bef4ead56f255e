"""Standard benchmarks (``--suite evalscope:NAME``): EvalScope's own adapters, run against the served endpoint.

omniserve does not re-implement MMLU or ChartQA: EvalScope 1.14.1 ships the adapters (prompt,
answer extraction, metric) and omniserve points them at the server. What omniserve adds is what
makes a score trustworthy and cheap to get wrong early:

- the name is checked against EvalScope's benchmark index (close matches on a typo);
- the data is the benchmark's published repository, copied under ``--dataset-dir DIR/<name>/``
  and read by EvalScope's own local loader; it is *loaded once before any server starts* (a
  worker process, offline), so a wrong layout fails in seconds with the files expected, and the
  item counts for the progress display are exact;
- nothing is downloaded unless ``--allow-download`` says so;
- the report records, per benchmark, the item count, EvalScope's version and a hash of every data file.

Only the standard library is imported at module level: ``--list-suites`` and validation read
EvalScope's JSON metadata from its installed package folder without importing it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from omniserve.eval.errors import DatasetMissing, EvalError, UnknownSuite

PREFIX = "evalscope:"
#: Replies of standard benchmarks are reasoned answers (chain of thought), not one word.
DEFAULT_MAX_TOKENS = 1024
#: Metrics where lower is better (error rates): retention and the gate's "drop" are read the other way.
LOWER_IS_BETTER = frozenset({"wer", "cer", "mer"})
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv", ".arrow", ".zip", ".txt")


class StandardDataMissing(DatasetMissing):
    """A standard benchmark without usable data: a flag mistake, found before any server starts."""

    exit_code = 2


class UnsupportedModality(EvalError):
    """The served model refuses the media a benchmark sends; found before the benchmark starts."""

    exit_code = 2


@dataclass(frozen=True)
class Entry:
    """A benchmark omniserve lists (and tests) with what EvalScope's metadata does not say."""

    family: str  # mcq | vqa | math | instruction | asr | video
    modality: str  # text | image | video | audio
    files: str  # the published files EvalScope reads, as they lie in the dataset repository


#: The benchmarks the issue names, with the layout of their published repositories. Any other
#: EvalScope benchmark name works too (its modality then comes from EvalScope's tags).
CATALOGUE: dict[str, Entry] = {
    "mmlu": Entry("mcq", "text", "README.md (configs) + all/test-*.parquet, all/dev-*.parquet (5-shot)"),
    "gsm8k": Entry("math", "text", "README.md (configs) + main/test-*.parquet, main/train-*.parquet (4-shot)"),
    "ifeval": Entry("instruction", "text", "ifeval_input_data.jsonl (the train split)"),
    "mmmu": Entry("mcq", "image", "README.md (configs) + <Subject>/validation-*.parquet, all 30 subjects"),
    "mm_bench": Entry("mcq", "image", "README.md (configs) + en/dev-*.parquet, cn/dev-*.parquet"),
    "ai2d": Entry("mcq", "image", "data/test-*.parquet"),
    "chartqa": Entry("vqa", "image", "data/test-*.parquet (question, answer, type, image)"),
    "docvqa": Entry("vqa", "image", "README.md (configs) + DocVQA/validation-*.parquet"),
    "math_vista": Entry("math", "image", "data/testmini-*.parquet"),
    "mvbench": Entry("video", "video", "README.md (configs) + json/<subset>.json, video/<archive>.zip"),
    "librispeech": Entry("asr", "audio", "data/test_clean-*.parquet, data/test_other-*.parquet"),
    "mmau": Entry("mcq", "audio", "data/test_mini-*.parquet"),
}
#: What the issue asks for that EvalScope 1.14.1 cannot run against an API model, and why.
NOT_SUPPORTED: dict[str, str] = {
    "videomme": "EvalScope 1.14.1 has only Video-MME v2 (evalscope:videomme_v2), which reads the official MP4 "
    "archives; Video-MME v1 is not an adapter",
    "air_bench_chat": "scored by an LLM judge (judge_score, win_rate): needs a second, judging model",
}


@dataclass(frozen=True)
class Info:
    """One benchmark as ``--list-suites`` shows it."""

    name: str
    pretty: str
    modality: str
    family: str
    metric: str
    dataset_id: str
    splits: list[str]
    subsets: list[str]
    files: str


def is_standard(ref: str) -> bool:
    return str(ref).startswith(PREFIX)


def evalscope_root() -> Path | None:
    """EvalScope's installed package folder (not imported), or None when the eval extra is missing."""
    spec = importlib.util.find_spec("evalscope")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@cache
def _index() -> dict[str, str]:
    root = evalscope_root()
    if root is None:
        return {}
    return json.loads((root / "benchmarks" / "_index.json").read_text("utf-8"))


@cache
def _meta(name: str) -> dict[str, Any]:
    root = evalscope_root()
    file = root / "benchmarks" / "_meta" / f"{name}.json" if root else None
    if file is None or not file.is_file():
        return {}
    return json.loads(file.read_text("utf-8")).get("meta", {})


def info(name: str) -> Info:
    """What omniserve knows about EvalScope benchmark ``name`` (which must exist)."""
    meta = _meta(name)
    tags = set(meta.get("tags") or [])
    entry = CATALOGUE.get(name)
    modality = entry.modality if entry else _modality(tags)
    family = entry.family if entry else _family(tags)
    metrics = meta.get("metrics") or ["?"]
    first = metrics[0]
    metric = next(iter(first)) if isinstance(first, dict) else str(first)
    splits = [s for s in (meta.get("eval_split"), meta.get("train_split") if meta.get("few_shot_num") else None) if s]
    dataset_id = str(meta.get("dataset_id") or "?")
    files = entry.files if entry else f"the files of the dataset repository {dataset_id}"
    return Info(
        name, str(meta.get("pretty_name") or name), modality, family, metric, dataset_id, splits,
        list(meta.get("subset_list") or []), files,
    )  # fmt: skip


def _modality(tags: set[str]) -> str:
    if "Video" in tags:
        return "video"
    if "Audio" in tags:
        return "audio"
    return "image" if "MultiModal" in tags else "text"


def _family(tags: set[str]) -> str:
    for tag, family in (("SpeechRecognition", "asr"), ("InstructionFollowing", "instruction"), ("MCQ", "mcq")):
        if tag in tags:
            return family
    if "Math" in tags:
        return "math"
    return "qa"


def resolve(ref: str) -> str:
    """``evalscope:NAME`` -> NAME when EvalScope has that benchmark; ``UnknownSuite`` with close matches else."""
    name = ref.removeprefix(PREFIX).strip()
    index = _index()
    if not index:
        raise UnknownSuite(f"{ref}: EvalScope is not installed here: pip install 'omniserve[eval]'")
    if name in index:
        return name
    if name in NOT_SUPPORTED:
        raise UnknownSuite(f"{ref}: not available: {NOT_SUPPORTED[name]}")
    lowered = {key.lower().replace("-", "_"): key for key in index}
    if name.lower().replace("-", "_") in lowered:
        return lowered[name.lower().replace("-", "_")]
    close = difflib.get_close_matches(name.lower(), list(index), n=5, cutoff=0.5)
    close += [key for key in index if name.lower() in key and key not in close][: 5 - len(close)]
    hint = f"close matches: {', '.join(PREFIX + c for c in close)}" if close else "see omniserve eval --list-suites"
    raise UnknownSuite(f"unknown EvalScope benchmark {name!r}; {hint}")


def listing(builtin: list[tuple[str, str, str]]) -> str:
    """The ``--list-suites`` table: built-in suites (name, format, scoring), then the standard benchmarks."""
    lines = ["Built-in suites (omniserve eval --suite NAME):", ""]
    lines += ["| suite | format | scoring |", "|---|---|---|"]
    lines += [f"| {name} | {fmt} | {scoring} |" for name, fmt, scoring in builtin]
    lines += ["", "Standard benchmarks through EvalScope (--suite evalscope:NAME, data from --dataset-dir):", ""]
    lines += ["| suite | benchmark | modality | family | metric | files under DIR/NAME/ |", "|---|---|---|---|---|---|"]
    if not _index():
        lines.append("| (EvalScope is not installed: pip install 'omniserve[eval]') | | | | | |")
    for name in CATALOGUE:
        if name in _index():
            i = info(name)
            lines.append(f"| {PREFIX}{name} | {i.pretty} | {i.modality} | {i.family} | {i.metric} | {i.files} |")
    others = sorted(set(_index()) - set(CATALOGUE))
    if others:
        lines += [
            "",
            f"Other EvalScope {_version() or ''} benchmarks are accepted as evalscope:NAME too ({len(others)}); not "
            "tested here, and those that need a judge model, a code sandbox or an agent environment do not run "
            "against a plain endpoint:",
        ]
        lines.append(", ".join(others))
    lines += ["", "Not available:"]
    lines += [f"- {name}: {why}" for name, why in NOT_SUPPORTED.items()]
    return "\n".join(lines) + "\n"


def _version() -> str | None:
    try:
        return metadata.version("evalscope")
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class StandardSuite:
    """The suite-shaped description the runner and the result reader use for a standard benchmark."""

    name: str  # "evalscope:mmlu": the report key, as the user typed it
    benchmark: str  # "mmlu"
    description: str
    scoring: str  # EvalScope's primary metric name
    modality: str
    max_tokens: int
    format: str = "evalscope"
    temperature: float = 0.0

    @property
    def generation(self) -> StandardSuite:  # the runner reads suite.generation.max_tokens / .temperature
        return self


@dataclass(frozen=True)
class StagedStandard:
    """A standard benchmark whose data EvalScope has already loaded once: exact counts, file hashes."""

    suite: StandardSuite
    benchmark: str
    local_path: Path | None  # None: EvalScope downloads (--allow-download)
    totals: dict[str, int]
    details: dict[str, Any]
    dataset_args: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    def job(self, base: dict[str, Any], media: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
        """The worker's job: the built-in job's connection and limits, this benchmark's data and media options."""
        return {
            **base,
            "kind": "standard-eval",
            "local_path": str(self.local_path) if self.local_path else None,
            "subsets": None,  # EvalScope's own subset list: the published benchmark, not a selection
            "limit": self.details.get("limit"),
            "media": media,
            "dataset_dir": str(cache_dir / "hub" / "evalscope-data"),
        }


def media_body(fps: float | None, max_frames: int | None, max_pixels: int | None) -> dict[str, Any]:
    """The per-request media options (the serving API's ``mm_processor_kwargs``), only those given."""
    values = {"fps": fps, "max_frames": max_frames, "max_pixels": max_pixels}
    return {k: v for k, v in values.items() if v is not None}


def stage_standards(
    refs: list[str],
    *,
    dataset_dir: Path | None,
    allow_download: bool,
    limit: int | None,
    max_tokens: int | None,
    cache_dir: Path,
    folder: Path,
) -> list[StagedStandard]:
    """Check names and data, let EvalScope load every benchmark once (one offline process): counts and hashes."""
    names = [resolve(ref) for ref in refs]
    local: dict[str, Path | None] = {}
    for name in names:
        about = info(name)
        if dataset_dir is not None:
            local[name] = (Path(dataset_dir).expanduser() / name).resolve()
            if not local[name].is_dir() or not any(_data_files(local[name])):
                raise StandardDataMissing(
                    f"{PREFIX}{name}: no data in {local[name]}: expected a copy of {about.dataset_id}: {about.files}"
                )
        elif allow_download:
            local[name] = None
        else:
            raise StandardDataMissing(
                f"{PREFIX}{name}: no data: pass --dataset-dir DIR with {name}/ holding a copy of {about.dataset_id} "
                f"({about.files}), or --allow-download to let EvalScope download it into --cache-dir"
            )
    loaded = _load_once(local, limit=limit, allow_download=allow_download, cache_dir=cache_dir, folder=folder)
    return [_staged(name, local[name], loaded.get(name) or {}, limit=limit, max_tokens=max_tokens) for name in names]


def _staged(
    name: str, local: Path | None, counts: dict[str, Any], *, limit: int | None, max_tokens: int | None
) -> StagedStandard:
    about = info(name)
    if "totals" not in counts:
        where = f"{local}" if local else "the dataset hub"
        raise StandardDataMissing(
            f"{PREFIX}{name}: EvalScope could not read the data from {where} ({counts.get('error', 'no result')}); "
            f"expected a copy of {about.dataset_id}: {about.files}"
        )
    totals = {str(k): int(v) for k, v in counts["totals"].items() if int(v) > 0}
    if not totals:
        raise StandardDataMissing(f"{PREFIX}{name}: {local or 'the dataset'} holds no items")
    details = {
        "benchmark": name,
        "pretty_name": about.pretty,
        "modality": about.modality,
        "family": about.family,
        "items": sum(totals.values()),
        "limit": limit,
        "evalscope": _version(),
        "lower_is_better": about.metric.lower() in LOWER_IS_BETTER,
        "dataset_id": about.dataset_id,
        "dataset_dir": str(local) if local else None,
        "downloaded": local is None,
        "files": file_hashes(local) if local else {},
    }
    suite = StandardSuite(
        name=f"{PREFIX}{name}",
        benchmark=name,
        description=f"{about.pretty} (EvalScope {name})",
        scoring=about.metric,
        modality=about.modality,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
    )
    return StagedStandard(suite=suite, benchmark=name, local_path=local, totals=totals, details=details)


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)


def file_hashes(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file of the dataset folder (what makes the score reproducible)."""
    hashes = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[file.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def _load_once(
    local: dict[str, Path | None], *, limit: int | None, allow_download: bool, cache_dir: Path, folder: Path
) -> dict[str, dict[str, Any]]:
    """EvalScope's own loader, in one worker process for every benchmark: name -> ``{"totals"}`` or ``{"error"}``."""
    from omniserve.eval.worker import evalscope_env

    folder = folder.resolve()  # the loader runs in ``folder``: a relative path would not be found from there
    folder.mkdir(parents=True, exist_ok=True)
    job_file, out = folder / "load-job.json", folder / "load-result.json"
    out.unlink(missing_ok=True)
    job = {
        "kind": "standard-load",
        "benchmarks": {name: str(path) if path else None for name, path in local.items()},
        "limit": limit,
        "dataset_dir": str(cache_dir / "hub" / "evalscope-data"),
        "result": str(out),
    }
    job_file.write_text(json.dumps(job, indent=2), "utf-8")
    env = evalscope_env(cache_dir, offline=not allow_download)
    with open(folder / "load.log", "wb") as log:
        code = subprocess.call(
            [sys.executable, "-m", "omniserve.eval.evalscope_worker", str(job_file)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
        )  # fmt: skip
    if out.is_file():
        return json.loads(out.read_text("utf-8"))
    tail = (folder / "load.log").read_text("utf-8", errors="replace").strip().splitlines()[-1:]
    reason = f"the loader exited with code {code}: {tail[0] if tail else 'no output'}"
    return {name: {"error": reason} for name in local}


def check_modalities(base_url: str, model: str, api_key: str, staged: list[StagedStandard]) -> None:
    """Refuse, before any benchmark starts, one whose media the served model does not take.

    A chat request with one (empty) part of that kind: omniserve checks the modality before it
    fetches or decodes anything, and answers 400 "does not accept". Other servers that reject the
    empty media for another reason are let through: their first item will say why.
    """
    import httpx

    needed = {s.suite.modality for s in staged} - {"text"}
    parts = {
        "image": {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
        "video": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}},
        "audio": {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
    }
    for modality in sorted(needed):
        body = {
            "model": model,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "probe"}, parts[modality]]}],
        }
        try:
            response = httpx.post(
                f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            )
        except httpx.HTTPError:
            continue  # a dead server is reported by the run itself
        message = response.text if response.status_code == 400 else ""
        if "does not accept" in message:
            names = ", ".join(s.suite.name for s in staged if s.suite.modality == modality)
            raise UnsupportedModality(
                f"{names}: the served model {model!r} does not take {modality} input; nothing was run"
            )
