"""Recipes, the built-in calibration set, and the CLI's import cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from omniserve.quantize.calibration import read_calibration
from omniserve.quantize.default_set import default_calibration_file, write_default_set
from omniserve.quantize.recipes import METHODS, load_recipe, recipes_dir


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_valid_recipe(method: str) -> None:
    recipe = load_recipe(method)
    assert recipe.source == recipes_dir() / f"{method}.yaml"
    assert recipe.scheme in recipe.schemes
    modifiers = recipe.build_modifiers(scheme=recipe.scheme, ignore=["lm_head"])
    assert modifiers[-1].scheme == recipe.scheme and "lm_head" in modifiers[-1].ignore


def test_recipe_defaults_match_the_issue() -> None:
    from compressed_tensors.quantization import preset_name_to_scheme

    gptq = preset_name_to_scheme(load_recipe("gptq").scheme, ["Linear"]).weights
    assert (gptq.num_bits, gptq.group_size, gptq.type) == (4, 128, "int")
    awq = preset_name_to_scheme(load_recipe("awq").scheme, ["Linear"]).weights
    assert (awq.num_bits, awq.group_size) == (4, 128)
    fp8 = preset_name_to_scheme(load_recipe("fp8").scheme, ["Linear"]).input_activations
    assert fp8.dynamic is True and fp8.num_bits == 8
    static = preset_name_to_scheme(load_recipe("fp8-static").scheme, ["Linear"]).input_activations
    assert static.dynamic is False
    assert [load_recipe(m).needs_calibration(load_recipe(m).scheme) for m in METHODS] == [True, True, False, True]


def test_default_calibration_set_is_what_the_generator_writes(tmp_path: Path) -> None:
    shipped = default_calibration_file().parent
    written = write_default_set(tmp_path).parent
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in written.iterdir())
    for name in ("default.jsonl", *(p.name for p in written.glob("*.png")), *(p.name for p in written.glob("*.flac"))):
        assert (shipped / name).read_bytes() == (written / name).read_bytes(), name
    assert sum(p.stat().st_size for p in shipped.iterdir()) < 100_000


def test_default_calibration_set_covers_every_modality() -> None:
    samples = read_calibration(default_calibration_file())
    kinds = [s.modalities for s in samples]
    assert len(samples) >= 30
    for kind in ("image", "video", "audio"):
        assert any(kind in k for k in kinds[:8]), f"no {kind} sample among the first 8"
    assert [sorted(k) for k in kinds[-4:]] == [[], ["image"], ["audio"], ["video"]]  # the held-out tail


def test_importing_the_cli_loads_no_heavy_library() -> None:
    heavy = "('torch', 'transformers', 'llmcompressor')"
    code = f"import sys, omniserve.quantize.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_component_patterns_cover_every_prefix_of_a_kept_component() -> None:
    import re

    from omniserve.quantize.ignore import component_patterns

    assert component_patterns(["lm_head"], "model") == [r"re:(.*\.)?lm_head(\..*)?$"]
    vl = component_patterns(
        ["model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head"], "model.language_model"
    )
    assert vl == [r"re:(.*\.)?visual(\..*)?$", r"re:(.*\.)?lm_head(\..*)?$"]
    visual = re.compile(vl[0].removeprefix("re:"))
    for name in ("model.visual.blocks.0.attn.qkv", "visual.blocks.0.attn.qkv", "thinker.visual.merger.mlp.0"):
        assert visual.match(name)
    for name in ("model.language_model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "visualizer.x"):
        assert not visual.match(name)
