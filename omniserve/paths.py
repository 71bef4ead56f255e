"""Where omniserve keeps what it builds, quantizes and downloads: one place that names every folder.

The environment (``XDG_CACHE_HOME``, the home folder) is read by the CLI alone, which builds a
``Folders`` and passes its paths down as options; library code only ever receives paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Folders:
    """omniserve's cache folders under one root (``$XDG_CACHE_HOME/omniserve``, ``~/.cache/omniserve`` by default)."""

    root: Path

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], home: Path) -> Folders:
        """The XDG base-directory rule: ``XDG_CACHE_HOME`` when set and not empty, else ``~/.cache``."""
        base = environ.get("XDG_CACHE_HOME") or str(home / ".cache")
        return cls(Path(base) / "omniserve")

    @property
    def models(self) -> Path:
        """Built-in tiny models, built on first use."""
        return self.root / "models"

    @property
    def quantized(self) -> Path:
        """``deploy --quant`` results, one folder per (model content, method, recipe, versions)."""
        return self.root / "quantized"

    @property
    def eval(self) -> Path:
        """Generated eval data, gate baselines and the EvalScope / Hugging Face caches of eval runs."""
        return self.root / "eval"
