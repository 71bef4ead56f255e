"""Separate learning rates for the media towers (vision / audio encoders) and the language model.

A vision tower trained from scratch through a language model gets its only learning signal through
that model's attention; if the language model moves fast, that signal keeps changing direction and
the tower learns nothing it has to compute itself (motion, say, as opposed to colour). A higher
rate for the towers than for the language model is the usual cure (ms-swift's ``vit_lr``, the
LLaVA recipes' projector rates). This builds the AdamW the trainer then schedules.
"""

from __future__ import annotations

from typing import Any

#: Module names (one component of a parameter's dotted name) that hold media encoders and projectors.
TOWER_MODULES = frozenset(
    {"visual", "audio_tower", "vision_tower", "vision_model", "audio_model", "multi_modal_projector"}
)


def is_tower_parameter(name: str) -> bool:
    return any(part in TOWER_MODULES for part in name.split("."))


def grouped_adamw(model: Any, *, learning_rate: float, tower_learning_rate: float, weight_decay: float) -> Any:
    """AdamW over the trainable parameters: towers at ``tower_learning_rate``, the rest at ``learning_rate``.

    Matrices decay, biases and norm weights (1-D) do not, as in transformers' default grouping.
    """
    import torch

    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((is_tower_parameter(name), parameter.ndim >= 2), []).append(parameter)
    param_groups = [
        {
            "params": params,
            "lr": tower_learning_rate if tower else learning_rate,
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (tower, decays), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
