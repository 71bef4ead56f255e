"""The quantization quality gate: real GPTQ passes, a model damaged on purpose is refused, results are cached.

The demo model scores ~90% on omni-synth, so a drop is measurable. llm-compressor offers no scheme
destructive enough on this model (GPTQ/AWQ W4A16 and FP8 all keep its score; tower quantization
needs a group size that divides the tiny towers' widths), so refusal is driven by a copy whose vision
and audio towers are zeroed: it can still answer the text task, nothing that needs its eyes or ears.
"""

from __future__ import annotations

import shutil
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
