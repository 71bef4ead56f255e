"""A wheel (what container images install) carries what the code reads from the top-level folders.

The file lists are checked in the wheel, and then the wheel is installed into a fresh virtual
environment so that the code's own lookups (``recipes_dir``, ``suites_dir``) are exercised on an
installed layout rather than on this checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [built] = folder.glob("omniserve-*.whl")
    return built


def _shipped(wheel: Path) -> set[str]:
    names = zipfile.ZipFile(wheel).namelist()
    return {n.split("/share/omniserve/", 1)[1] for n in names if "/share/omniserve/" in n}


def _files(folder: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}


def test_wheel_ships_quantization_recipes_and_calibration_set(wheel: Path) -> None:
    shipped = _shipped(wheel)
    assert _files("quantize") <= shipped
    assert "quantize/gptq.yaml" in shipped and "quantize/calibration/default.jsonl" in shipped


def test_wheel_ships_every_eval_suite_with_its_data(wheel: Path) -> None:
    shipped = _shipped(wheel)
    assert _files("eval") <= shipped, sorted(_files("eval") - shipped)
    assert {"eval/omni-synth.yaml", "eval/image-mcq/images/colour-00.png"} <= shipped


def test_wheel_ships_the_demo_model(wheel: Path) -> None:
    """`omniserve deploy` with no --model serves the demo model from the installed package."""
    names = set(zipfile.ZipFile(wheel).namelist())
    demo = ROOT / "omniserve" / "models" / "demo" / "tiny-omni-demo"
    expected = {p.relative_to(ROOT).as_posix() for p in demo.iterdir() if p.is_file()}
    assert "omniserve/models/demo/tiny-omni-demo/model.safetensors" in expected
    assert expected <= names


def test_wheel_ships_the_playground_page(wheel: Path) -> None:
    """`GET /` of an installed server reads the page's files from the package (omniserve/server/static)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "omniserve" / "server" / "static"
    expected = {p.relative_to(ROOT).as_posix() for p in static.iterdir() if p.is_file()}
    assert "omniserve/server/static/playground.html" in expected
    assert expected <= names, sorted(expected - names)


def test_installed_wheel_finds_its_suites_and_recipes(wheel: Path, tmp_path: Path) -> None:
    """Installed (not from this checkout), the built-in suites load with their data and the recipes resolve."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = """
import json, sys
from omniserve.eval.suites import builtin_suites, load_suite, suites_dir
from omniserve.quantize.recipes import recipes_dir
data = {}
for name in builtin_suites():
    folder = load_suite(name).data_dir()
    data[name] = sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder else None
from omniserve.server.playground import read_static
page = len(read_static("playground.html"))
print(json.dumps({"suites": str(suites_dir()), "recipes": str(recipes_dir()), "prefix": sys.prefix, "data": data,
                  "page": page}))
"""
    # the dependencies come from this environment; omniserve itself only from the fresh one
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["suites"] == f"{found['prefix']}/share/omniserve/eval"
    assert found["recipes"] == f"{found['prefix']}/share/omniserve/quantize"
    assert set(found["data"]) == {"asr-synth", "image-mcq", "omni-synth", "text-mcq", "text-qa", "tools-synth"}
    for generated in ("asr-synth", "omni-synth", "tools-synth"):  # generated at run time
        assert found["data"][generated] is None
    assert found["page"] == (ROOT / "omniserve" / "server" / "static" / "playground.html").stat().st_size
    for name in ("image-mcq", "text-mcq", "text-qa"):
        expected = sorted(p.name for p in (ROOT / "eval" / name).rglob("*") if p.is_file())
        assert found["data"][name] == expected, name
