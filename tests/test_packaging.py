"""A wheel (what container images install) carries what the code reads from the top-level folders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_quantization_recipes_and_calibration_set(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("omniserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/share/omniserve/", 1)[1] for n in names if "/share/omniserve/" in n}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "quantize").rglob("*") if p.is_file()}
    assert expected <= shipped
    assert "quantize/gptq.yaml" in shipped and "quantize/calibration/default.jsonl" in shipped


def test_wheel_ships_the_demo_model(tmp_path: Path) -> None:
    """`omniserve deploy` with no --model serves the demo model from the installed package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("omniserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = ROOT / "omniserve" / "models" / "demo" / "tiny-omni-demo"
    expected = {p.relative_to(ROOT).as_posix() for p in demo.iterdir() if p.is_file()}
    assert "omniserve/models/demo/tiny-omni-demo/model.safetensors" in expected
    assert expected <= names
