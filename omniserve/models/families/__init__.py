"""The registry of model families omniserve knows: one small module each, looked up by architecture.

``family_for(config)`` answers which family a checkpoint belongs to; an architecture transformers
does not ship is refused with the nearest supported family named (``UnsupportedArchitecture``).
Text-only causal LMs transformers ships are served without a family module of their own.
Importing this package stays cheap: the family modules import torch and transformers only to build.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError
from omniserve.models.families import (
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_onevision,
    mistral3,
    qwen2_5_omni,
    qwen2_5_vl,
    qwen2_audio,
    qwen2_vl,
    qwen3_vl,
)
from omniserve.models.families.base import MEDIA_KINDS, Family

__all__ = [
    "FAMILIES",
    "MEDIA_KINDS",
    "Family",
    "UnsupportedArchitecture",
    "architecture_of",
    "check_supported",
    "family_for",
    "get",
]

#: Every family with a tiny builder and a tested column in docs/models.md, in the matrix's order.
FAMILIES: tuple[Family, ...] = (
    qwen2_5_omni.FAMILY,
    qwen2_vl.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    qwen2_audio.FAMILY,
    llava.FAMILY,
    llava_onevision.FAMILY,
    gemma3.FAMILY,
    idefics3.FAMILY,
    internvl.FAMILY,
    mistral3.FAMILY,
)
_BY_ARCH = {arch: family for family in FAMILIES for arch in family.architectures}
_BY_NAME = {family.name: family for family in FAMILIES}


class UnsupportedArchitecture(ModelLoadError):
    """A checkpoint whose architecture no engine here can load."""


def get(name: str) -> Family:
    """The family registered as ``name`` (``KeyError`` naming the known ones otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(_BY_NAME)}") from None


def architecture_of(config: Any) -> str:
    """``architectures[0]`` of a transformers config or a ``config.json`` mapping ("" when absent)."""
    archs = config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)
    return (archs or [""])[0] or ""


def family_for(config: Any) -> Family | None:
    """The registered family of a checkpoint; None for a text-only causal LM transformers ships.

    Raises ``UnsupportedArchitecture`` for an architecture transformers does not know, naming the
    nearest family omniserve supports.
    """
    arch = architecture_of(config)
    if arch in _BY_ARCH:
        return _BY_ARCH[arch]
    import transformers

    if arch and getattr(transformers, arch, None) is not None:
        return None
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if arch.endswith("ForCausalLM") and model_type in transformers.CONFIG_MAPPING:
        return None  # a renamed causal LM of a type transformers knows: AutoModelForCausalLM loads it
    raise UnsupportedArchitecture(_unsupported_message(arch))


def check_supported(path: Path) -> Family | None:
    """``family_for`` of the checkpoint folder ``path``, from its ``config.json`` (before transformers reads it)."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the loader says what is wrong with the folder itself
    return family_for(config)


def _unsupported_message(arch: str) -> str:
    if not arch:
        return "config.json names no architecture (`architectures` is empty); omniserve cannot tell how to load it"
    known = sorted(_BY_ARCH)
    nearest = difflib.get_close_matches(arch, known, n=1, cutoff=0.0)
    hint = f"; the nearest supported family is {_BY_ARCH[nearest[0]].title} ({nearest[0]})" if nearest else ""
    return f"architecture {arch} is not supported: transformers {_version()} has no such model class{hint}"


def _version() -> str:
    from importlib.metadata import version

    return version("transformers")
