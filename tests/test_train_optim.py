"""The media towers get their own learning rate; biases and norms are not decayed."""

from __future__ import annotations

from pathlib import Path

from omniserve.train.optim import grouped_adamw, is_tower_parameter


def test_towers_and_language_model_get_their_own_rates(tiny_omni: Path) -> None:
    from omniserve.engines.hf_model import load_model

    module = load_model(tiny_omni).lm
    optimizer = grouped_adamw(module, learning_rate=1e-3, tower_learning_rate=1e-2, weight_decay=0.1)

    rate_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.named_parameters())
    assert len(rate_of) == len(names)
    for name, parameter in names.items():
        lr, decay = rate_of[id(parameter)]
        assert lr == (1e-2 if name.startswith(("visual.", "audio_tower.")) else 1e-3), name
        assert decay == (0.1 if parameter.ndim >= 2 else 0.0), name


def test_tower_names_match_whole_components_only() -> None:
    assert is_tower_parameter("visual.blocks.0.attn.qkv.weight")
    assert is_tower_parameter("base_model.model.audio_tower.conv1.weight")
    assert not is_tower_parameter("model.layers.0.self_attn.q_proj.weight")
    assert not is_tower_parameter("model.visualizer.weight")
