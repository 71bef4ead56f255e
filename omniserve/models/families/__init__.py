"""The registry of model families omniserve knows: one small module each, looked up by architecture.

``family_for(config)`` answers which family a checkpoint belongs to; an architecture transformers
does not ship is refused with the nearest supported family named (``UnsupportedArchitecture``), and so
is a family omniserve knows it cannot run (``REFUSED``: each says why), before any engine tries it.
Text-only causal LMs transformers ships are served without a family module of their own; any other
checkpoint without one (a multimodal config, or a class that is not a causal LM) is refused too.
Importing this package stays cheap: the family modules import torch and transformers only to build.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError
from omniserve.models.families import (
    gemma3,
    gemma3n,
    glm4v,
    idefics3,
    internvl,
    llava,
    llava_next_video,
    llava_onevision,
    mistral3,
    mllama,
    phi4_multimodal,
    qwen2_5_omni,
    qwen2_5_vl,
    qwen2_audio,
    qwen2_vl,
    qwen3_omni,
    qwen3_vl,
)
from omniserve.models.families.base import MEDIA_KINDS, Family

__all__ = [
    "FAMILIES",
    "MEDIA_KINDS",
    "NOT_BUILT",
    "REFUSED",
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
    llava_next_video.FAMILY,
    gemma3.FAMILY,
    gemma3n.FAMILY,
    idefics3.FAMILY,
    internvl.FAMILY,
    mistral3.FAMILY,
    glm4v.FAMILY,
    mllama.FAMILY,
    phi4_multimodal.FAMILY,
    qwen3_omni.FAMILY,
)
#: Families transformers ships that omniserve refuses at load, with the reason (``Family.refused``): rather
#: than let a checkpoint of theirs pass as a text-only causal LM and fail, or answer wrongly, in an engine.
REFUSED: tuple[Family, ...] = ()
#: Multimodal families transformers ships that have no tiny builder here yet, by architecture: (title, why).
#: docs/models.md lists them, so a missing row is never read as untested-but-fine.
NOT_BUILT: Mapping[str, tuple[str, str]] = {}
_BY_ARCH = {arch: family for family in (*FAMILIES, *REFUSED) for arch in family.architectures}
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
    nearest family omniserve supports, for a family omniserve refuses (``REFUSED``), saying why, and for
    a checkpoint without a family module that is not a text-only causal LM (``_not_text_only``).
    """
    arch = architecture_of(config)
    if arch in _BY_ARCH:
        family = _BY_ARCH[arch]
        if family.refused:
            raise UnsupportedArchitecture(f"architecture {arch} ({family.title}) is not supported: {family.refused}")
        return family
    import transformers

    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    known = bool(arch) and getattr(transformers, arch, None) is not None
    # a renamed causal LM of a type transformers knows: AutoModelForCausalLM loads it
    renamed = arch.endswith("ForCausalLM") and model_type in transformers.CONFIG_MAPPING
    if not (known or renamed):
        raise UnsupportedArchitecture(_unsupported_message(arch))
    why = _not_text_only(arch, config, known=known)
    if why:
        raise UnsupportedArchitecture(_no_family_message(arch, why))
    return None


#: Sub-config keys that carry an encoder for a medium (``vision_config``, ``audio_config``, ``visual_config``, ...).
_MEDIA_CONFIG = re.compile(r"(vision|visual|image|video|audio|speech)\w*_config$")


def _not_text_only(arch: str, config: Any, *, known: bool) -> str:
    """Why a checkpoint without a family module is not a text-only causal LM ("" when it is one).

    Decided from the checkpoint, never from a list of architectures: a sub-config of a medium's encoder anywhere
    in its config (BLIP-2's ``vision_config``; nested ones too, as in an Omni ``thinker_config``), or a model class
    transformers does not register as a causal LM (``AutoModelForCausalLM``'s mapping). Served as text-only,
    such a model would crash deep in an engine or answer without its media; refused at load instead.
    """
    raw = config if isinstance(config, Mapping) else config.to_dict()
    media = sorted(_media_configs(raw))
    if media:
        return f"it is a multimodal model (its config has {', '.join(media)})"
    if known:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return "transformers does not register it as a causal language model (AutoModelForCausalLM)"
    return ""


def _media_configs(config: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted keys of every medium's sub-config in ``config``, nested ones included."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            if _MEDIA_CONFIG.search(key):
                yield prefix + key
            else:
                yield from _media_configs(value, f"{prefix}{key}.")


def _no_family_message(arch: str, why: str) -> str:
    title, reason = NOT_BUILT.get(arch, ("", ""))
    known = f" ({title}: {reason})" if reason else ""
    return (
        f"architecture {arch} is not supported: {why}, and omniserve has no family module for it{known}; "
        f"omniserve serves the families in docs/models.md and text-only causal LMs{_nearest(arch)}"
    )


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
    return f"architecture {arch} is not supported: transformers {_version()} has no such model class{_nearest(arch)}"


def _nearest(arch: str) -> str:
    """ "; the nearest supported family is ..." by the architecture's name ("" when none is registered)."""
    known = sorted(arch for family in FAMILIES for arch in family.architectures)
    nearest = difflib.get_close_matches(arch, known, n=1, cutoff=0.0)
    return f"; the nearest supported family is {_BY_ARCH[nearest[0]].title} ({nearest[0]})" if nearest else ""


def _version() -> str:
    from importlib.metadata import version

    return version("transformers")
