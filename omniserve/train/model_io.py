"""Load a checkpoint folder for training and save the result in the same layout, so it serves as-is.

Loading uses the loader the engine serves with (``models.loading``): the module trained is the
module the server generates with (``generating_module``: the thinker of an Omni checkpoint, the model
itself otherwise), and a checkpoint the engine would refuse is refused here too.
Saving writes the weights of the *whole* model class as loaded (an Omni checkpoint stays an Omni
checkpoint with its thinker updated) and copies every other file of the source folder unchanged:
tokenizer, processor settings, chat template, ``spk_dict.pt`` and ``config.json`` /
``generation_config.json`` too, because the trainer edits the in-memory config (it sets
``use_cache=False``) and those edits must not leak into the served model. So the output differs from
the source in its weights only, and ``omniserve deploy --model OUT`` renders prompts exactly as for
the source model. Weight names are the ones the source's family publishes (``write_legacy_names``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError

#: Weight files: written by ``save_pretrained``, never copied from the source.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
#: Language-model projections LoRA adapts (vision/audio towers stay frozen in LoRA mode), fused ones included
#: (Phi-3-style decoders, Phi-4-multimodal's: ``qkv_proj``, ``gate_up_proj``).
LORA_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)"


@dataclass
class TrainableModel:
    source: Path
    full: Any  # the model class named in config.json, as loaded
    module: Any  # the part that generates: what the trainer optimises


def check_model_folder(path: Path) -> None:
    """Refuse a folder that is not a transformers checkpoint, before anything slow happens."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model folder (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} is not a model folder (no weight files)")


def load_trainable(path: Path, *, dtype: str = "float32") -> TrainableModel:
    """Load ``path`` as the engine does and refuse missing weights, as the engine does (no training on noise)."""
    from omniserve.models.loading import generating_module, load_checkpoint, refuse_missing

    check_model_folder(path)
    checkpoint = load_checkpoint(path, dtype=dtype, device="cpu")
    refuse_missing(path, checkpoint.report)
    module = generating_module(checkpoint.model)
    module.train()
    return TrainableModel(source=path, full=checkpoint.model, module=module)


def add_lora(model: TrainableModel, *, rank: int, alpha: int, dropout: float) -> Any:
    """Wrap the generating module with LoRA adapters on its language-model projections; return the wrapper."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model.module, config)


def merge_lora(peft_model: Any) -> Any:
    """Fold the adapters into the base weights in place (the full model sees the merged module)."""
    return peft_model.merge_and_unload()


def write_legacy_names(source: Path, saved: Path) -> None:
    """Rename the weights ``save_pretrained`` wrote to ``saved`` as the source's family publishes them.

    transformers 5 writes some families (LLaVA-style towers, Qwen2-Audio) under names no published checkpoint
    carries and vLLM does not map (``Family.legacy_names``); written the publishers' way, the trained model loads in
    vLLM as the source did, and transformers still converts the names on load.
    """
    from omniserve.models.families import check_supported
    from omniserve.models.families.base import rename_weights

    family = check_supported(source)
    if family is not None and family.legacy_names:
        rename_weights(saved, family.legacy_names)


def save_like_source(model: TrainableModel, output: Path, *, dtype: str | None = None) -> Path:
    """Write the full model + the source's other files to ``output``; ``config.json`` appears last.

    The files are staged in a hidden sibling folder and moved in one by one with ``config.json``
    (what marks a folder as a model) moved last, so a reader never takes a half-written folder for
    a model. ``output`` may already hold other things (the run's ``checkpoints/``).
    """
    import torch

    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", suffix=".partial", dir=output))
    try:
        full = model.full
        if dtype is not None:
            full = full.to(getattr(torch, dtype))
        full.save_pretrained(staging, safe_serialization=True)
        write_legacy_names(model.source, staging)
        for item in model.source.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, staging / item.name)  # replaces save_pretrained's config files
        names = sorted(p.name for p in staging.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            (staging / name).replace(output / name)
            (output / name).chmod(0o644)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
