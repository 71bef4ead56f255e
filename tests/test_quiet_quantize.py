"""``omniserve quantize`` shows omniserve's lines and one progress display, not the libraries' own bars.

llm-compressor and compressed-tensors draw tqdm bars of their own ("Applying quantization config",
"Compressing model", "Calibrating", ...) in the hardware probe, in ``oneshot``, at save and at the
reload that verifies the result. They are kept out of the terminal unless ``--log-level debug``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: Progress-bar labels of llm-compressor, compressed-tensors and accelerate seen in a quantize run.
LIBRARY_BARS = (
    "Applying quantization config",
    "Compressing model",
    "Decompressing model",
    "Dispatching model",
    "Calibrating",
)


def _quantize(model: Path, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    omniserve = str(Path(sys.executable).with_name("omniserve"))  # the installed command, as a user runs it
    command = [omniserve, "quantize", "--model", str(model), "--method", "fp8"]
    return subprocess.run(
        [*command, "--output", str(output), *extra], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_library_progress_bars_only_at_debug(tiny_qwen2: Path, tmp_path: Path, debug: bool) -> None:
    run = _quantize(tiny_qwen2, tmp_path / "out", *(["--log-level", "debug"] if debug else []))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "quantized checkpoint written to" in run.stderr  # omniserve's own line
    assert "Encoding calibration samples" in run.stderr  # omniserve's own progress display
    assert "# Quantization report" in run.stdout and str(tmp_path / "out") in run.stdout
    shown = [label for label in LIBRARY_BARS if label in run.stderr]
    # llm-compressor's import-time console line (a loguru sink on stdout, added before any option reaches it)
    accelerator = "No accelerator available!"
    if debug:
        assert "Applying quantization config" in shown and "Compressing model" in shown, run.stderr[-3000:]
        assert accelerator in run.stdout + run.stderr
    else:
        assert not shown, run.stderr[-3000:]
        assert accelerator not in run.stdout + run.stderr
        assert run.stdout.startswith("# Quantization report"), run.stdout[:500]  # stdout holds the report only
