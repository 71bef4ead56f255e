"""One LoRA adapter as the server sees it, read from a PEFT folder and checked against the served base.

``read_adapter`` reads only small things: ``adapter_config.json`` and the safetensors *header* (names,
shapes), never the tensors, so it is cheap enough to run for every run-time load (in a thread) and
it imports neither torch nor peft. Everything that would make an adapter answer wrongly or crash a
forward pass is refused here with an ``InvalidRequest`` naming the cause: a missing or malformed
file, a base of another architecture or hidden size, a rank above ``--max-lora-rank``, weights for
modules the base does not have. The engine may refuse more (``Engine.check_adapter``: vLLM cannot
apply tower weights).

Module paths are those of the module that generates (``models.loading.generating_module``: the
thinker of an Omni checkpoint), as ``omniserve train --lora`` wraps it and PEFT names the weights
(``base_model.model.<path>.lora_A.weight``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.errors import InvalidRequest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: A safetensors header larger than this is not an adapter's (it lists names and shapes only).
_MAX_HEADER_BYTES = 64 * 1024 * 1024
#: ``<module path>.lora_A.weight`` (Linear), ``<module path>.lora_embedding_A`` (Embedding); PEFT strips the
#: adapter's own name on save.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_(?:embedding_)?[AB])(?:\.weight)?$")
#: A path component that marks a module outside the language model: vision/audio towers and projectors.
_TOWER_WORDS = ("visual", "vision", "audio", "projector", "merger", "image", "video")


@dataclass(frozen=True)
class LoraAdapter:
    """A served adapter; ``name`` is what clients send as ``model``."""

    name: str
    path: Path  # folder with adapter_config.json + adapter_model.safetensors (PEFT layout)
    int_id: int  # > 0, unique per name for the life of the server (vLLM's lora_int_id)
    rank: int
    target_modules: tuple[str, ...]  # module paths the weights touch, without the lora_A/lora_B suffix
    tower_modules: tuple[str, ...]  # those of target_modules outside the language model


@dataclass(frozen=True)
class LoraBase:
    """What an adapter is checked against: the served base model, described once at start-up.

    ``modules`` maps each module path of the generating module to ``(in, out)`` sizes for linear
    layers and embeddings (``None`` for other modules, which exist but are not checked for shape).
    An empty mapping means the module tree is unknown: only the config checks apply.
    """

    path: Path
    architectures: tuple[str, ...]
    hidden_size: int | None
    max_lora_rank: int
    modules: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: Path, *, max_lora_rank: int) -> LoraBase:
        """The base described from its folder; builds the model on torch's meta device (no weights read).

        Blocking (imports transformers): call it in a thread from async code.
        """
        import torch
        from transformers import AutoConfig

        from omniserve.models.loading import generating_module, model_class

        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = model_class(config)._from_config(config)
        modules: dict[str, tuple[int, int] | None] = {}
        for name, module in generating_module(model).named_modules():
            if not name:
                continue
            if isinstance(module, torch.nn.Linear):
                modules[name] = (module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Embedding):
                modules[name] = (module.num_embeddings, module.embedding_dim)
            else:
                modules[name] = None
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        thinker = getattr(config, "thinker_config", None)  # Omni: the thinker's text config holds the sizes
        if thinker is not None:
            text = thinker.get_text_config(decoder=True)
        return cls(
            path=Path(path),
            architectures=tuple(getattr(config, "architectures", None) or ()),
            hidden_size=getattr(text, "hidden_size", None),
            max_lora_rank=max_lora_rank,
            modules=modules,
        )


def adapter_base(folder: Path) -> Path | None:
    """The base checkpoint folder an adapter folder was trained on, when ``folder`` is an adapter.

    PEFT records the base as ``base_model_name_or_path``; ``omniserve train --lora --no-merge-lora`` writes
    the path it trained from. Commands that only need the base's template and processor (``check-parity``)
    accept the adapter folder itself this way. None: not an adapter folder, or its base is not a folder here.
    """
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    recorded = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not recorded:
        return None
    base = Path(recorded)
    if not base.is_absolute():
        base = (folder / base) if (folder / base).is_dir() else base
    return base if (base / "config.json").is_file() else None


def is_tower_module(path: str) -> bool:
    """Whether a module path lies outside the language model (a vision/audio tower or a projector)."""
    return any(word in part for part in path.split(".") for word in _TOWER_WORDS)


def read_adapter(name: str, path: Path, int_id: int, base_config: LoraBase) -> LoraAdapter:
    """The adapter in ``path`` checked against ``base_config``; ``InvalidRequest`` (400) naming what is wrong.

    Blocking (reads two files): call it in a thread from async code. Startup callers turn the
    ``InvalidRequest`` into a ``ModelLoadError``.
    """
    if int_id <= 0:
        raise ValueError("int_id must be positive")
    where = f"LoRA adapter {name!r} ({path})"
    config = _adapter_config(path, where)
    shapes = _header_shapes(path / ADAPTER_WEIGHTS, where)
    _check_base(config, base_config, where)
    found: dict[str, dict[str, list[int]]] = {}
    others = []
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        found.setdefault(match["module"], {})[match["part"].replace("embedding_", "")] = shape
    if others:
        raise InvalidRequest(
            f"{where} holds weights that are not LoRA matrices ({_listed(others)}); only lora_A/lora_B weights are "
            "served (save the adapter without modules_to_save, or merge it)",
            param="lora_path",
        )
    if not found:
        raise InvalidRequest(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights", param="lora_path")
    rank = _check_modules(found, base_config, where)
    if rank > base_config.max_lora_rank:
        raise InvalidRequest(
            f"{where} has rank {rank}, above this server's limit of {base_config.max_lora_rank} (--max-lora-rank)",
            param="lora_path",
        )
    targets = tuple(sorted(found))
    return LoraAdapter(
        name=name,
        path=Path(path),
        int_id=int_id,
        rank=rank,
        target_modules=targets,
        tower_modules=tuple(m for m in targets if is_tower_module(m)),
    )


def _adapter_config(path: Path, where: str) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise InvalidRequest(f"{where}: no such folder", param="lora_path")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequest(f"{where}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)", param="lora_path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{where}: {ADAPTER_CONFIG} is not readable JSON: {exc}", param="lora_path") from None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{where}: {ADAPTER_CONFIG} is not a JSON object", param="lora_path")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidRequest(f"{where}: peft_type is {peft_type}, only LORA adapters are served", param="lora_path")
    if config.get("use_dora"):
        raise InvalidRequest(f"{where}: DoRA adapters (use_dora) are not served", param="lora_path")
    return config


def _header_shapes(file: Path, where: str) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than its header length")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes")
            raw = handle.read(length)
            if len(raw) != length:
                raise ValueError("file shorter than its header")
            size = file.stat().st_size
        header = json.loads(raw)
        shapes: dict[str, list[int]] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shape, (start, end) = [int(n) for n in entry["shape"]], entry["data_offsets"]
            if not 0 <= start <= end <= size - 8 - length:
                raise ValueError(f"tensor {key} lies past the end of the file")
            shapes[key] = shape
    except FileNotFoundError:
        raise InvalidRequest(f"{where}: no {ADAPTER_WEIGHTS}", param="lora_path") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise InvalidRequest(
            f"{where}: {ADAPTER_WEIGHTS} is not a readable safetensors file: {exc}", param="lora_path"
        ) from None
    return shapes


def _check_base(config: dict[str, Any], base: LoraBase, where: str) -> None:
    """The adapter's recorded base, when its folder is at hand, must be of the served architecture."""
    recorded = config.get("base_model_name_or_path")
    if not recorded or not base.architectures:
        return
    try:
        theirs = json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # trained elsewhere (a hub name, another machine): the module and shape checks decide
    architectures = tuple(theirs.get("architectures") or ())
    if architectures and architectures != base.architectures:
        raise InvalidRequest(
            f"{where} was trained on a {', '.join(architectures)} base ({recorded}); this server serves a "
            f"{', '.join(base.architectures)} ({base.path})",
            param="lora_path",
        )


def _check_modules(found: dict[str, dict[str, list[int]]], base: LoraBase, where: str) -> int:
    """Each module exists in the base with the sizes the matrices expect; the adapter's largest rank."""
    rank = 0
    missing, mismatched = [], []
    for module, parts in sorted(found.items()):
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            raise InvalidRequest(f"{where}: module {module} lacks its lora_A or lora_B matrix", param="lora_path")
        rank = max(rank, a[0])
        if base.modules and module not in base.modules:
            missing.append(module)
            continue
        sizes = base.modules.get(module)
        if sizes is not None and (a[1], b[0]) != sizes:
            mismatched.append((module, (a[1], b[0]), sizes))
    if missing:
        raise InvalidRequest(
            f"{where} has weights for modules the base model does not have: {_listed(missing)} "
            f"(base: {', '.join(base.architectures) or base.path})",
            param="lora_path",
        )
    if mismatched:
        module, theirs, ours = mismatched[0]
        sizes = f"{module} is {theirs[0]}->{theirs[1]} in the adapter and {ours[0]}->{ours[1]} in the base"
        hidden = base.hidden_size
        if hidden is not None and hidden in ours:  # the side that is the hidden size tells the adapter's
            sizes += f": hidden size {theirs[ours.index(hidden)]} in the adapter, {hidden} in the base"
        raise InvalidRequest(
            f"{where} was trained on a model of another size ({sizes})",
            param="lora_path",
        )
    return rank


def _listed(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
