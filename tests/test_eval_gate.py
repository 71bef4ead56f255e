"""The quantization quality gate: real GPTQ passes, a model damaged on purpose is refused, results are cached.

The demo model scores ~90% on omni-synth, so a drop is measurable. llm-compressor offers no scheme
destructive enough on this model (GPTQ/AWQ W4A16 and FP8 all keep its score; tower quantization
needs a group size that divides the tiny towers' widths), so refusal is driven by a copy whose vision
and audio towers are zeroed: it can still answer the text task, nothing that needs its eyes or ears.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omniserve.eval.errors import GateRefused, GateUnavailable, UnknownSuite
from omniserve.eval.gate import DEFAULT_MAX_DROP, InvalidGateSpec, gate_or_refuse, parse_gate_spec

LIMIT = 4  # items per omni-synth task: 20 questions per model


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from omniserve.models.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate-eval-cache")


@pytest.fixture(scope="module")
def damaged(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("damaged") / "tiny-omni-demo-deaf-blind"
    shutil.copytree(demo_model, folder)
    weights = load_file(folder / "model.safetensors")
    towers = [name for name in weights if ".audio_tower." in name or ".visual." in name]
    assert towers, "the demo model has no towers to damage"
    for name in towers:
        weights[name] = weights[name] * 0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_gate_passes_real_gptq_and_runs_once(demo_model: Path, eval_cache: Path, tmp_path: Path) -> None:
    from omniserve.quantize.cache import ensure_quantized

    # the cache entry deploy --quant serves (8 calibration samples instead of the recipe's 128: test time)
    quantized = ensure_quantized(demo_model, "gptq", cache_dir=tmp_path / "quant-cache", num_samples=8, progress=False)
    # 5 points = one question of the 20: GPTQ may flip one answer of this tiny model, not more
    result = gate_or_refuse(demo_model, quantized, "omni-synth:5", False, limit=LIMIT, cache_dir=eval_cache)
    assert result.passed and not result.forced and not result.cached
    assert result.original >= 0.75 and result.drop <= 5
    assert result.record.parent == quantized / "omniserve-gate"  # beside the quantized checkpoint
    assert "quality gate 'omni-synth' passed" in result.summary()
    started = time.monotonic()
    again = gate_or_refuse(demo_model, quantized, "omni-synth:5", False, limit=LIMIT, cache_dir=eval_cache)
    assert again.cached and (again.original, again.quantized) == (result.original, result.quantized)
    assert time.monotonic() - started < 5  # no server was started


def test_gate_refuses_a_damaged_model_with_both_scores(demo_model: Path, damaged: Path, eval_cache: Path) -> None:
    with pytest.raises(GateRefused) as info:
        gate_or_refuse(demo_model, damaged, "omni-synth:5", False, limit=LIMIT, cache_dir=eval_cache)
    refused = info.value
    assert refused.original >= 0.75 and refused.original - refused.quantized > 0.05
    message = str(refused)
    assert f"{refused.quantized * 100:.1f} vs {refused.original * 100:.1f} for the original" in message
    assert "allowed: 5" in message and "--force" in message
    forced = gate_or_refuse(demo_model, damaged, "omni-synth:5", True, limit=LIMIT, cache_dir=eval_cache)
    assert forced.forced and not forced.passed and forced.cached  # decided again from the cached scores
    loose = gate_or_refuse(demo_model, damaged, "omni-synth:100", False, limit=LIMIT, cache_dir=eval_cache)
    assert loose.passed and loose.cached


def test_gate_spec_parsing() -> None:
    assert parse_gate_spec("omni-synth").max_drop == DEFAULT_MAX_DROP
    assert parse_gate_spec("omni-synth:0.5") == parse_gate_spec("omni-synth:0.5")
    assert parse_gate_spec("omni-synth:0.5").max_drop == 0.5
    assert parse_gate_spec("/suites/my:suite.yaml:3").suite == "/suites/my:suite.yaml"
    assert parse_gate_spec("/suites/my:suite.yaml").suite == "/suites/my:suite.yaml"
    for bad in ("omni-synth:-1", ":2", "omni-synth:nan"):
        with pytest.raises(InvalidGateSpec):
            parse_gate_spec(bad)


def test_gate_fails_fast_on_bad_input(demo_model: Path, damaged: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(UnknownSuite):
        gate_or_refuse(demo_model, damaged, "no-such-suite", False, cache_dir=tmp_path)
    with pytest.raises(GateUnavailable, match="gate the full-precision checkpoint"):
        gate_or_refuse(demo_model, demo_model, "omni-synth", False, cache_dir=tmp_path)
    assert time.monotonic() - started < 5  # refused before any model was loaded


# --- `omniserve deploy --quant METHOD --gate SUITE`, as users run it ---------------------------------------------

CLI = [sys.executable, "-m", "omniserve.cli", "deploy"]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME of the deploy commands below, shared so the original is scored once."""
    return tmp_path_factory.mktemp("gate-cli-cache")


def _deploy(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=env)


def test_deploy_gates_a_real_quantization_once(demo_model: Path, cli_cache: Path, tmp_path: Path) -> None:
    quant_cache = tmp_path / "quantized"
    args = ["--model", str(demo_model), "--quant", "gptq", "--quant-cache-dir", str(quant_cache), "--quantize-only"]
    first = _deploy([*args, "--gate", "omni-synth:5"], cli_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = Path(first.stdout.strip().splitlines()[-1])
    assert folder.parent == quant_cache
    assert "quality gate 'omni-synth' passed: quantized" in first.stderr
    (record,) = (folder / "omniserve-gate").glob("omni-synth-*.json")  # cached with the quantized checkpoint
    scores = json.loads(record.read_text())
    assert scores["original"] >= 0.75 and (scores["original"] - scores["quantized"]) * 100 <= 5

    started = time.monotonic()
    again = _deploy([*args, "--gate", "omni-synth:5"], cli_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "quality gate 'omni-synth' passed (cached)" in again.stderr
    assert time.monotonic() - started < 60  # neither quantized nor evaluated again
    # a stricter allowed drop is decided again from the same cached scores
    strict = _deploy([*args, "--gate", "omni-synth:0"], cli_cache)
    drop_is_zero = scores["quantized"] >= scores["original"]
    assert strict.returncode == (0 if drop_is_zero else 3), strict.stderr[-3000:]


def test_deploy_gate_refusal_exits_3_with_both_scores(
    demo_model: Path,
    damaged: Path,
    cli_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What deploy runs after quantizing, on a quantized model that lost its towers: no quantizer here breaks it."""
    import typer

    from omniserve.cli_errors import exit_on
    from omniserve.config import DeployOptions
    from omniserve.eval.errors import EvalError
    from omniserve.flags import parse_argv
    from omniserve.paths import Folders

    # the server options deploy parsed; the eval cache is the one `deploy` used above, so the original is cached
    server = parse_argv(DeployOptions, ["--dtype=float32", "--device=cpu"], what="deploy")
    eval_cache = Folders.from_environment({"XDG_CACHE_HOME": str(cli_cache)}, Path.home()).eval
    with pytest.raises(typer.Exit) as info, exit_on(EvalError):
        gate_or_refuse(demo_model, damaged, "omni-synth:5", False, server=server, cache_dir=eval_cache)
    assert info.value.exit_code == 3
    message = capsys.readouterr().err
    assert "quality gate 'omni-synth' refused the quantized model:" in message and "for the original" in message
    assert "--force" in message
    forced = gate_or_refuse(demo_model, damaged, "omni-synth:5", True, server=server, cache_dir=eval_cache)
    assert "FAILED, served anyway (--force) (cached)" in forced.summary()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gate", "omni-synth"], "--gate compares a quantized model with its original: it needs --quant"),
        (["--quant", "gptq", "--force"], "--force overrides a failed quality gate: it needs --gate"),
        (["--quant", "gptq", "--gate", "no-such-suite"], "no-such-suite"),
        (["--quant", "gptq", "--gate", "omni-synth:-3"], "the allowed drop must be a number of points >= 0"),
    ],
)
def test_deploy_gate_mistakes_are_refused_before_quantizing(
    demo_model: Path, cli_cache: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    quant_cache = tmp_path / "quantized"
    out = _deploy(
        ["--model", str(demo_model), "--quant-cache-dir", str(quant_cache), "--quantize-only", *args], cli_cache
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr
    assert not quant_cache.exists() or not any(quant_cache.iterdir()), "nothing was quantized"


def test_missing_eval_extra_is_refused_before_anything_starts(demo_model: Path, tmp_path: Path) -> None:
    """Without EvalScope installed (really not importable: a site folder without it), say which extra to install."""
    import sysconfig

    site = tmp_path / "site-without-evalscope"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith("evalscope"):
            (site / entry.name).symlink_to(entry)
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{root}{os.pathsep}{site}", "PATH": os.environ["PATH"], "XDG_CACHE_HOME": str(tmp_path)}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        """``omniserve ARGV`` in a Python that sees no site-packages (-S) but the folder above."""
        command = [sys.executable, "-S", "-m", "omniserve.cli", *argv]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    quant_cache = tmp_path / "quantized"
    deploy = ["deploy", "--model", str(demo_model), "--quant", "gptq", "--quant-cache-dir", str(quant_cache)]
    gate = cli(*deploy, "--gate", "omni-synth", "--quantize-only")
    assert gate.returncode == 2, gate.stderr[-2000:]
    assert "evalscope is not installed here: pip install 'omniserve[eval]'" in gate.stderr
    assert not quant_cache.exists(), "nothing was quantized"
    run = cli("eval", "--suite", "text-mcq", "--url", "http://127.0.0.1:9/v1", "--output", str(tmp_path / "run"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "pip install 'omniserve[eval]'" in run.stderr
