"""The quantization quality gate behind ``omniserve deploy --quant METHOD --gate SUITE[:max-drop]``.

Before a quantized model is served, both it and its full-precision original are scored on one suite
(each behind a real ``omniserve deploy``, as users would serve them). If the quantized one scores
more than ``max-drop`` points lower (percentage points, default 2) the gate refuses with both
scores, unless forced. A gate that cannot produce both scores (a run failed or was incomplete) is
an error, never a pass.

The scores are cached in the quantized checkpoint's folder (``omniserve-gate/``), keyed by
everything that decides them (suite file and data, item limit, engine and deploy flags, both
models' files, library versions), so the gate runs once per quantized checkpoint; the allowed drop
is not part of the key, so changing it re-decides without re-evaluating. The original's score is
also cached in the eval cache, shared by every method quantized from the same original.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from omniserve.atomic_files import write_text_atomic
from omniserve.config import DeployOptions
from omniserve.eval.datasets import generator_fingerprint
from omniserve.eval.errors import EvalError, GateRefused, GateUnavailable
from omniserve.eval.report import library_versions
from omniserve.eval.runner import EvalOptions, run_evaluation
from omniserve.eval.standard import LOWER_IS_BETTER, StandardDataMissing, file_hashes, info, is_standard, resolve
from omniserve.eval.suites import Suite, load_suite
from omniserve.eval.target import evaluation_server
from omniserve.eval.worker import require_eval_extra

log = logging.getLogger("omniserve.eval")
DEFAULT_MAX_DROP = 2.0
#: Engine options that can change what a model answers (the others only schedule the same work).
_SCORE_OPTIONS = {"dtype", "device", "max_model_len", "engine_args"}
GATE_FOLDER = "omniserve-gate"


class InvalidGateSpec(EvalError):
    exit_code = 2


@dataclass(frozen=True)
class GateSpec:
    suite: str
    max_drop: float = DEFAULT_MAX_DROP


@dataclass(frozen=True)
class GateResult:
    """Both scores (fractions in [0, 1]) and the decision; ``record`` is the cached JSON."""

    suite: str
    original: float
    quantized: float
    max_drop: float
    passed: bool
    forced: bool
    cached: bool
    record: Path

    @property
    def drop(self) -> float:
        """Points lost (negative: the quantized model scored higher)."""
        return (self.original - self.quantized) * 100

    def summary(self) -> str:
        verdict = "passed" if self.passed else ("FAILED, served anyway (--force)" if self.forced else "failed")
        source = " (cached)" if self.cached else ""
        return (
            f"quality gate {self.suite!r} {verdict}{source}: quantized {self.quantized * 100:.1f} vs original "
            f"{self.original * 100:.1f}, drop {self.drop:.1f} points (allowed {self.max_drop:g})"
        )


def parse_gate_spec(spec: str) -> GateSpec:
    """``SUITE`` or ``SUITE:MAX_DROP`` (points); a suite file path may itself contain ':'."""
    head, sep, tail = spec.rpartition(":")
    suite, max_drop = spec, DEFAULT_MAX_DROP
    if sep:
        try:
            max_drop = float(tail)
            suite = head
        except ValueError:
            pass
    if not suite.strip():
        raise InvalidGateSpec(f"--gate {spec!r}: expected SUITE or SUITE:MAX_DROP, e.g. omni-synth:2")
    if not math.isfinite(max_drop) or max_drop < 0:
        raise InvalidGateSpec(f"--gate {spec!r}: the allowed drop must be a number of points >= 0")
    return GateSpec(suite=suite.strip(), max_drop=max_drop)


def check_gate_spec(spec: str, *, dataset_dir: Path | None = None) -> GateSpec:
    """``spec`` parsed, its suite loaded and the eval extra present: everything that can fail before a model loads."""
    parsed = parse_gate_spec(spec)
    require_eval_extra()
    if is_standard(parsed.suite):
        _standard_data(parsed.suite, dataset_dir)
    else:
        load_suite(parsed.suite)
    return parsed


@dataclass(frozen=True)
class _StandardGate:
    """A standard benchmark (``evalscope:NAME``) as the gate needs it: name, data folder, what decides its score."""

    ref: str
    dataset_dir: Path
    fingerprint: str

    @property
    def name(self) -> str:
        return self.ref

    @property
    def path(self) -> None:
        return None

    def model_dump(self, mode: str = "json") -> dict[str, str]:
        return {"standard": self.ref}


def _standard_data(ref: str, dataset_dir: Path | None) -> _StandardGate:
    """The benchmark's data folder, checked (exit 2 before anything is quantized); WER-like metrics refused."""
    name = resolve(ref)
    about = info(name)
    if about.metric.lower() in LOWER_IS_BETTER:
        raise InvalidGateSpec(
            f"--gate {ref}: its metric ({about.metric}) falls as quality rises; the gate compares scores where "
            "higher is better"
        )
    folder = Path(dataset_dir).expanduser() / name if dataset_dir is not None else None
    if folder is None or not folder.is_dir():
        where = f"{folder} does not exist" if folder is not None else "no --gate-dataset-dir was given"
        raise StandardDataMissing(
            f"--gate {ref}: {where}; pass --gate-dataset-dir DIR with {name}/ holding a copy of "
            f"{about.dataset_id} ({about.files})"
        )
    digest = _digest(file_hashes(folder))
    return _StandardGate(
        ref=f"evalscope:{name}", dataset_dir=Path(dataset_dir).expanduser().resolve(), fingerprint=digest
    )


def gate_or_refuse(
    original: Path,
    quantized: Path,
    spec: str,
    force: bool,
    *,
    cache_dir: Path,
    server: DeployOptions | None = None,
    limit: int | None = None,
) -> GateResult:
    """Score both models on the gate suite (or reuse cached scores); raise ``GateRefused`` on a too-large drop.

    Both models are served as ``server`` describes (the deploy command's engine, engine options and
    media limits; default: ``omniserve deploy``'s defaults). With ``force`` a failing gate returns
    ``GateResult(passed=False, forced=True)`` instead of raising.
    Raises ``GateUnavailable`` when a score cannot be produced, ``UnknownSuite``/``InvalidSuite``/
    ``DatasetMissing`` for a bad suite (before any model is loaded).
    """
    parsed = parse_gate_spec(spec)
    server = server or DeployOptions()
    suite: Suite | _StandardGate = (
        _standard_data(parsed.suite, server.gate_dataset_dir) if is_standard(parsed.suite) else load_suite(parsed.suite)
    )
    original, quantized = Path(original).resolve(), Path(quantized).resolve()
    if original == quantized:
        raise GateUnavailable(
            f"--gate compares a quantized model with its original, but {original} was served as it is "
            "(already quantized?): gate the full-precision checkpoint instead"
        )
    common = _common_key(suite, limit, server)
    key = _digest({**common, "original": _files(original), "quantized": _files(quantized)})
    record = _record_path(quantized, cache_dir, _file_name(suite.name), key)
    cached = record.is_file()
    if cached:
        scores = json.loads(record.read_text("utf-8"))
        original_score, quantized_score = float(scores["original"]), float(scores["quantized"])
        log.info("quality gate %s: cached scores from %s", suite.name, record)
    else:
        runs = record.parent / "runs" / key
        base_key = _digest({**common, "original": _files(original)})
        original_score = _baseline(original, suite, base_key, runs / "original", cache_dir, server, limit)
        quantized_score = _score(quantized, suite, runs / "quantized", cache_dir, server, limit)
        write_text_atomic(
            record,
            json.dumps(
                {
                    "suite": suite.name,
                    "original": original_score,
                    "quantized": quantized_score,
                    "original_model": str(original),
                    "quantized_model": str(quantized),
                    "limit": limit,
                    "engine": server.engine,
                    "runs": str(runs),
                },
                indent=2,
            )
            + "\n",
        )
    passed = (original_score - quantized_score) * 100 <= parsed.max_drop + 1e-9
    result = GateResult(
        suite.name, original_score, quantized_score, parsed.max_drop, passed, force and not passed, cached, record
    )
    if not passed and not force:
        raise GateRefused(suite.name, original_score, quantized_score, parsed.max_drop)
    if not passed:
        log.warning("%s", result.summary())
    return result


def _file_name(name: str) -> str:
    return name.replace(":", "-")


def _baseline(
    model: Path,
    suite: Suite | _StandardGate,
    key: str,
    run: Path,
    cache_dir: Path,
    server: DeployOptions,
    limit: int | None,
) -> float:
    """The original's score, shared through the eval cache by every quantization of it."""
    file = cache_dir / "gate-baselines" / f"{_file_name(suite.name)}-{key}.json"
    if file.is_file():
        return float(json.loads(file.read_text("utf-8"))["score"])
    score = _score(model, suite, run, cache_dir, server, limit)
    write_text_atomic(file, json.dumps({"model": str(model), "suite": suite.name, "score": score}) + "\n")
    return score


def _score(
    model: Path, suite: Suite | _StandardGate, run: Path, cache_dir: Path, server: DeployOptions, limit: int | None
) -> float:
    log.info("quality gate %s: evaluating %s", suite.name, model)
    standard = isinstance(suite, _StandardGate)
    options = EvalOptions(
        suites=[suite.ref if standard else str(suite.path)],
        server=evaluation_server(server, model),
        output=run,
        limit=limit,
        cache_dir=cache_dir,
        dataset_dir=suite.dataset_dir if standard else None,
    )
    report = run_evaluation(options)
    result = report.suites[suite.name]
    if result.status != "complete" or result.score is None:
        problems = "; ".join(result.errors) or result.status
        raise GateUnavailable(f"quality gate {suite.name!r}: no complete score for {model} ({problems}); see {run}")
    return result.score


def _record_path(quantized: Path, cache_dir: Path, suite: str, key: str) -> Path:
    """Beside the quantized checkpoint when writable, else in the eval cache (a read-only model folder)."""
    for folder in (quantized / GATE_FOLDER, cache_dir / "gates" / _digest({"path": str(quantized)})):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("")
            probe.unlink()
            return folder / f"{suite}-{key}.json"
        except OSError:
            continue
    raise GateUnavailable(f"cannot write the gate's results next to {quantized} nor into {cache_dir}")


def _common_key(suite: Suite | _StandardGate, limit: int | None, server: DeployOptions) -> dict[str, object]:
    """What decides the scores besides the models; scheduling limits (concurrency, queue) do not."""
    versions = library_versions()
    scored = evaluation_server(server, Path("."))
    return {
        "format": 2,
        "suite": suite.model_dump(mode="json"),
        "data": suite.fingerprint if isinstance(suite, _StandardGate) else _data_fingerprint(suite),
        "limit": limit,
        "engine": scored.engine,
        "engine_options": scored.engine_options.model_dump(mode="json", include=_SCORE_OPTIONS),
        "media": scored.server.media.model_dump(mode="json"),
        "versions": {k: versions.get(k) for k in ("omniserve", "evalscope", "torch", "transformers", "vllm")},
    }


def _data_fingerprint(suite: Suite) -> str:
    folder = suite.data_dir()
    if folder is None:  # generated: what decides the data is the generator's code and parameters
        return generator_fingerprint(suite)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _files(model: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of the checkpoint's files: a re-quantized or edited model misses the cache."""
    return sorted(
        (p.relative_to(model).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in model.rglob("*")
        if p.is_file() and GATE_FOLDER not in p.relative_to(model).parts
    )


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
