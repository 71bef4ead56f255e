"""The verification report written inside every quantized checkpoint: JSON for tools, a table for people.

It travels with the checkpoint (a folder copied elsewhere still says how it was made and how close
it is to the original), and the cache reads it back to recognise a complete entry.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPORT_JSON = "quantization_report.json"
REPORT_TABLE = "quantization_report.md"
#: Bumped when the report's fields change meaning.
REPORT_VERSION = 1

#: Libraries whose versions decide the output (the cache entry name's "-v" suffix is made from them).
LIBRARIES = ("omniserve", "torch", "transformers", "llmcompressor", "compressed-tensors")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass
class Report:
    model: str
    architecture: str
    method: str
    scheme: str
    recipe: dict[str, str]
    quantization_format: str
    size_before_bytes: int
    size_after_bytes: int
    seconds: dict[str, float]
    calibration: dict[str, Any]
    quantized_modules: list[str]
    kept_modules: list[str]
    verification: dict[str, Any]
    fidelity: dict[str, Any] | None
    options: dict[str, Any]
    library_warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=library_versions)

    @property
    def ratio(self) -> float:
        return round(self.size_after_bytes / self.size_before_bytes, 4) if self.size_before_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "model": self.model,
            "architecture": self.architecture,
            "method": self.method,
            "scheme": self.scheme,
            "recipe": self.recipe,
            "format": self.quantization_format,
            "size": {"before_bytes": self.size_before_bytes, "after_bytes": self.size_after_bytes, "ratio": self.ratio},
            "seconds": self.seconds,
            "calibration": self.calibration,
            "modules": {
                "quantized_count": len(self.quantized_modules),
                "kept_count": len(self.kept_modules),
                "quantized": self.quantized_modules,
                "kept": self.kept_modules,
            },
            "verification": self.verification,
            "fidelity": self.fidelity,
            "options": self.options,
            "library_warnings": self.library_warnings,
            "versions": self.versions,
        }

    def table(self) -> str:
        """A short Markdown table: what was done, what it cost, how close the result is."""
        cal = self.calibration
        kinds = ", ".join(f"{n} {k}" for k, n in cal.get("by_modality", {}).items()) or "none"
        if cal.get("used"):
            calibration = f"{cal['used']} samples ({kinds}), {cal['pipeline']} pipeline"
        else:
            calibration = "none needed (data-free)"
        if cal.get("skipped"):
            calibration += "; skipped (modality not supported): " + ", ".join(
                f"{n} {k}" for k, n in cal["skipped"].items()
            )
        if self.fidelity:
            f = self.fidelity
            fidelity = (
                f"logit cosine {f['logit_cosine']:.4f}, KL {f['kl_nats']:.5f} nats/token, "
                f"top-1 agreement {100 * f['top1_agreement']:.1f}% "
                f"({f['samples']} held-out samples: {', '.join(f['modalities'])}; {f['tokens']} tokens)"
            )
        else:
            fidelity = "not measured (no held-out samples)"
        verification = self.verification
        rows = [
            ("method / scheme", f"{self.method} / {self.scheme} ({self.quantization_format})"),
            (
                "size on disk (weights)",
                f"{_mib(self.size_before_bytes)} -> {_mib(self.size_after_bytes)} ({self.ratio:.2f}x)",
            ),
            ("time", ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())),
            ("quantized", f"{len(self.quantized_modules)} modules: {_groups(self.quantized_modules)}"),
            ("kept in full precision", f"{len(self.kept_modules)} Linear modules: {_groups(self.kept_modules)}"),
            ("calibration", calibration),
            (
                "reload",
                "no missing/unexpected weights; "
                f"{verification['kept_parameters_checked']} kept parameters bit-identical to the original",
            ),
            ("fidelity vs original", fidelity),
        ]
        lines = [f"# Quantization report: {self.model}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> None:
        (folder / REPORT_JSON).write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        (folder / REPORT_TABLE).write_text(self.table())


def read_report(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _groups(names: list[str], limit: int = 6) -> str:
    """Module names summarised by their parent up to the layer index: 'thinker.model.layers (14), ...'."""
    if not names:
        return "none"
    counts: Counter[str] = Counter()
    for name in names:
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
        counts[".".join(parts[: max(cut, 1)])] += 1
    shown = [f"{k} ({n})" for k, n in counts.most_common(limit)]
    if len(counts) > limit:
        shown.append(f"and {len(counts) - limit} more groups")
    return ", ".join(shown)
