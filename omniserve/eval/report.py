"""One evaluation run as data: ``report.json`` (everything) and ``report.md`` (a table for people).

A score is a fraction in [0, 1] or ``None``; ``None`` always comes with an entry in ``errors``
(a metric that could not be computed is never shown as 0). ``status`` says how much of a suite
was scored: ``complete``, ``incomplete`` (some items failed or the server went away: the score
covers the items that were scored), ``error`` (no usable score) or ``not-run``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from omniserve.atomic_files import write_text_atomic

if TYPE_CHECKING:
    from omniserve.eval.datasets import StagedSuite
    from omniserve.eval.standard import StagedStandard

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FORMAT = "omniserve-eval/1"
Status = Literal["complete", "incomplete", "error", "not-run"]
_VERSIONED = ("omniserve", "evalscope", "openai", "torch", "transformers", "compressed-tensors", "vllm", "sglang")


class SubsetScore(BaseModel):
    score: float | None
    samples: int


class SampleCounts(BaseModel):
    requested: int = 0
    scored: int = 0
    errored: int = 0


class SuiteResult(BaseModel):
    suite: str
    description: str = ""
    format: str
    scoring: str
    benchmark: str
    metric: str = Field(description="The primary metric the score is (EvalScope's name).")
    status: Status
    score: float | None = None
    subsets: dict[str, SubsetScore] = Field(default_factory=dict)
    samples: SampleCounts = Field(default_factory=SampleCounts)
    errors: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    evalscope_dir: str | None = None
    standard: dict[str, Any] | None = Field(
        None, description="Standard benchmarks: items, EvalScope version, dataset files' sha256, media options."
    )

    @classmethod
    def of(cls, staged: StagedSuite | StagedStandard, **fields: Any) -> SuiteResult:
        """A result for ``staged``: what it is (suite, description, format, scoring, benchmark) taken from it,
        the outcome from ``fields``, so every way a suite ends reports the same identity."""
        suite = staged.suite
        return cls(
            suite=suite.name,
            description=suite.description,
            format=suite.format,
            scoring=suite.scoring,
            benchmark=staged.benchmark,
            **fields,
        )


class RunReport(BaseModel):
    format: str = FORMAT
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    complete: bool = True
    target: dict[str, Any]
    options: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str | None] = Field(default_factory=lambda: library_versions())
    suites: dict[str, SuiteResult] = Field(default_factory=dict)

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``folder``; return both paths."""
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
        write_text_atomic(json_path, self.model_dump_json(indent=2) + "\n")
        write_text_atomic(md_path, self.markdown())
        return json_path, md_path

    @classmethod
    def load(cls, folder_or_file: Path) -> RunReport:
        path = Path(folder_or_file)
        path = path / REPORT_JSON if path.is_dir() else path
        return cls.model_validate(json.loads(path.read_text("utf-8")))

    def label(self) -> str:
        """Short name of the scored model for tables and plots: model, plus quantization when there is one."""
        name = str(self.target.get("model") or self.target.get("url") or "?")
        quant = self.target.get("quant")
        return f"{name} ({quant})" if quant else name

    def markdown(self) -> str:
        lines = [f"# Evaluation of {self.label()}", ""]
        where = self.target.get("model_path") or self.target.get("url")
        lines.append(f"- target: {self.target.get('mode')} `{where}`, engine {self.target.get('engine', 'n/a')}")
        lines.append(f"- created: {self.created}; complete: {'yes' if self.complete else 'NO'}")
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items() if v))
        lines += ["", "| suite | metric | score | items | status | subsets |", "|---|---|---|---|---|---|"]
        for result in self.suites.values():
            subsets = ", ".join(f"{name} {_pct(s.score)} ({s.samples})" for name, s in result.subsets.items())
            items = f"{result.samples.scored}/{result.samples.requested}"
            row = [result.suite, result.metric, _pct(result.score), items, result.status, subsets or "-"]
            lines.append("| " + " | ".join(row) + " |")
        standard = [r for r in self.suites.values() if r.standard]
        if standard:  # what makes a standard benchmark's score reproducible
            lines += ["", "## Standard benchmarks", ""]
            for r in standard:
                info = r.standard or {}
                data = info.get("dataset_dir") or f"downloaded ({info.get('dataset_id')})"
                media = ", ".join(f"{k}={v}" for k, v in (info.get("media") or {}).items()) or "server defaults"
                lines.append(
                    f"- **{r.suite}**: {info.get('items')} items, EvalScope {info.get('evalscope')}, data `{data}` "
                    f"({len(info.get('files') or {})} files hashed), media {media}"
                )
        problems = [(r.suite, e) for r in self.suites.values() for e in r.errors]
        if problems:
            lines += ["", "## Errors", ""]
            lines += [f"- **{suite}**: {error.splitlines()[0] if error else error}" for suite, error in problems]
        return "\n".join(lines) + "\n"


def library_versions() -> dict[str, str | None]:
    """Installed versions of what decides a score (None: not installed); read without importing anything."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _pct(score: float | None) -> str:
    return "error" if score is None else f"{score * 100:.1f}"
