"""Several LoRA adapters resident on one transformers model, each batch row with its own (or none).

Adapters are injected into the generating module in place with PEFT (``inject_adapter_in_model``),
each under an internal key (``lora<int_id>``: served names may hold dots, which module keys cannot),
so the engine's references to the model stay valid. Outside ``per_row`` every LoRA layer's active
adapter is a name none has: a forward pass is the base model's. Inside, a forward pre-hook on every
LoRA layer hands it ``adapter_names`` (one per row), which PEFT's mixed-batch path applies to the
rows that name each adapter (``LoraLayer._mixed_batch_forward``; the base rows get ``__base__``).

Towers (vision/audio encoders, projectors) see patches or frames, not batch rows: their inputs'
first dimension is not the text batch. The assumption, which the transformers engine keeps, is that
media are encoded one request at a time, so a forward that runs a tower carries one adapter choice;
the tower's LoRA layers apply that one to all their rows. A tower forward in a batch that mixes
adapters is refused (``RuntimeError``), never silently given the wrong weights.

Loading and unloading change the module tree; a forward pass must not see it half-changed. Both take
the model's lock, which ``per_row`` holds for the whole forward pass; the file reads happen before.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omniserve.errors import InvalidRequest
from omniserve.lora.adapter import ADAPTER_WEIGHTS, LoraAdapter, is_tower_module

#: The active adapter outside ``per_row``: no layer has it, so every layer runs as the base.
_NONE_ACTIVE = "__omniserve_base__"
#: PEFT's name for "no adapter on this row" in ``adapter_names``.
_BASE_ROW = "__base__"


def adapter_key(adapter: LoraAdapter) -> str:
    """The module key an adapter is stored under (served names may hold characters module keys cannot)."""
    return f"lora{adapter.int_id}"


class _ModelLoras:
    """The adapters resident on one module and the per-row choice of the forward pass under way."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.keys: dict[str, str] = {}  # served name -> module key
        self.rows: list[str] | None = None  # module key or _BASE_ROW per batch row, inside per_row
        self.hooked: set[int] = set()  # ids of LoRA layers that carry the pre-hook


_STATES: weakref.WeakKeyDictionary[Any, _ModelLoras] = weakref.WeakKeyDictionary()


def _generating(model: Any) -> Any:
    from omniserve.models.loading import generating_module

    return generating_module(model)


def _state(model: Any) -> _ModelLoras | None:
    return _STATES.get(model) or _STATES.get(_generating(model))


def adapter_names(rows: Sequence[object]) -> list[str | None]:
    """The adapter name of each batch row: a row carries ``adapter`` (a ``GenerationRequest``) or a ``request``
    that does; anything else (a warm-up row) is the base."""
    names: list[str | None] = []
    for row in rows:
        adapter = getattr(row, "adapter", None) or getattr(getattr(row, "request", None), "adapter", None)
        names.append(adapter.name if adapter is not None else None)
    return names


@contextlib.contextmanager
def per_row(model: Any, names: Sequence[str | None]) -> Iterator[None]:
    """The next forward passes of ``model`` apply adapter ``names[i]`` to batch row ``i`` (None: the base).

    ``model`` is the model the engine holds or its generating module. An unknown name is a
    ``KeyError`` (the registry loads an adapter before any request using it is batched). The model's
    lock is held throughout, so an adapter never appears or goes mid-pass.
    """
    state = _state(model)
    if state is None:
        if any(name is not None for name in names):
            raise KeyError(f"no LoRA adapter is loaded on this model (asked: {sorted({n for n in names if n})})")
        yield
        return
    with state.lock:
        rows = [_BASE_ROW if name is None else state.keys[name] for name in names]
        state.rows = None if all(row == _BASE_ROW for row in rows) else rows
        try:
            yield
        finally:
            state.rows = None


def _pre_hook(state: _ModelLoras, tower: bool, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Give a LoRA layer the current rows' adapters (PEFT reads ``adapter_names`` in its forward)."""
    rows = state.rows
    if rows is None:
        return None
    x = args[0] if args else kwargs["x"]
    if tower:  # patches or frames of the one request whose media are being encoded
        chosen = set(rows)
        if len(chosen) != 1:
            raise RuntimeError(
                "a vision/audio tower ran in a batch that mixes LoRA adapters; media must be encoded one "
                "request at a time"
            )
        kwargs["adapter_names"] = [rows[0]] * x.shape[0]
    else:
        kwargs["adapter_names"] = rows
    return args, kwargs


class TransformersLora:
    """The transformers engine's LoRA hooks (``check_adapter``, ``load_adapter``, ``unload_adapter``).

    ``model`` is the model the engine loaded; adapters go onto its generating module (the thinker of
    an Omni checkpoint), the module ``omniserve train --lora`` wraps.
    """

    def __init__(self, model: Any) -> None:
        self._module = _generating(model)
        self._state = _STATES.setdefault(self._module, _ModelLoras())

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._state.keys)

    def check_adapter(self, adapter: LoraAdapter) -> None:
        """Every module the adapter touches must exist in the loaded module (towers included)."""
        from omniserve.extras import missing_extra_message, missing_modules

        missing_peft = missing_modules(["peft"])
        if missing_peft:
            raise InvalidRequest(
                missing_extra_message("lora", missing_peft, "needed to apply LoRA adapters on the transformers engine"),
                param="model",
            )
        names = {name for name, _ in self._module.named_modules()}
        missing = [m for m in adapter.target_modules if m not in names]
        if missing:
            raise InvalidRequest(
                f"LoRA adapter {adapter.name!r} has weights for modules the loaded model does not have: "
                f"{', '.join(missing[:5])}",
                param="model",
            )

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        await asyncio.to_thread(self.load, adapter)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self.unload, name)

    def load(self, adapter: LoraAdapter) -> None:
        """Read the adapter's files, then inject and fill its layers under the lock (blocking)."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        if adapter.name in self._state.keys:
            return
        key = adapter_key(adapter)
        config = LoraConfig.from_pretrained(str(adapter.path))
        config.inference_mode = True
        weights = load_file(str(Path(adapter.path) / ADAPTER_WEIGHTS))
        weights = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
        # exactly the saved modules, whatever target_modules pattern the config holds
        config.target_modules = set(adapter.target_modules)
        config.exclude_modules = None
        with self._state.lock:
            inject_adapter_in_model(config, self._module, adapter_name=key)
            result = set_peft_model_state_dict(self._module, weights, adapter_name=key)
            unexpected = [k for k in getattr(result, "unexpected_keys", ()) if "lora_" in k]
            if unexpected:
                self._forget_config(key)
                self._drop(key)
                raise InvalidRequest(
                    f"LoRA adapter {adapter.name!r}: weights PEFT could not place: {', '.join(unexpected[:5])}",
                    param="model",
                )
            self._forget_config(key)
            self._settle()
            self._state.keys[adapter.name] = key

    def unload(self, name: str) -> None:
        with self._state.lock:
            key = self._state.keys.pop(name, None)
            if key is not None:
                self._drop(key)

    def _forget_config(self, key: str) -> None:
        """PEFT records each injected config on the module; the next injection would warn about it."""
        configs = getattr(self._module, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(key, None)
            if not configs:
                del self._module.peft_config

    def _layers(self) -> Iterator[tuple[str, Any]]:
        from peft.tuners.lora import LoraLayer

        for name, module in self._module.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def _drop(self, key: str) -> None:
        for _, layer in self._layers():
            if key in layer.lora_A or key in getattr(layer, "lora_embedding_A", {}):
                layer.delete_adapter(key)
        self._settle()

    def _settle(self) -> None:
        """Every LoRA layer: inference mode, no adapter active outside ``per_row``, the pre-hook once."""
        from functools import partial

        for name, layer in self._layers():
            layer.eval()
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
            layer._active_adapter = [_NONE_ACTIVE]  # set_adapter would re-enable gradients
            if id(layer) not in self._state.hooked:
                layer.register_forward_pre_hook(
                    partial(_pre_hook, self._state, is_tower_module(name)), with_kwargs=True
                )
                self._state.hooked.add(id(layer))
