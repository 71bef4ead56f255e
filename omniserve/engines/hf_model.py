"""Loading a transformers checkpoint and running its two kinds of forward pass: prefill and decode.

Continuous batching needs one thing ``generate()`` does not offer: sequences that join and leave
a running batch. So each prompt is prefilled alone (with its media), and decode steps run on one
left-padded KV cache holding every running sequence. Models with multimodal rotary positions
(Qwen2-VL family) get explicit per-row positions from the offset they report after prefill.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass
class LoadedModel:
    model: Any  # the full model as loaded (kept for its config and weights)
    lm: Any  # the module that maps (input_ids, media) -> logits; the thinker for Omni checkpoints
    dtype: Any
    device: Any
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    accepts_logits_to_keep: bool = False


def load_model(path: Path, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a checkpoint folder (no config.json)")
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES.values()))}")
    torch_dtype = getattr(torch, _DTYPES[dtype])
    try:
        config = AutoConfig.from_pretrained(str(path))
        arch = (getattr(config, "architectures", None) or [""])[0]
        model_cls = getattr(transformers, arch, None) or AutoModelForCausalLM
        quantized = _quantized_load_kwargs(config)
        with _load_report() as report:
            model = model_cls.from_pretrained(str(path), dtype=torch_dtype, **quantized)
        if quantized:
            from compressed_tensors.offload import remove_dispatch

            # dequantizing leaves every weight behind compressed-tensors' offload wrapper, which keeps it on
            # the CPU through .to(device) and re-fetches it on each access: give the model plain parameters
            remove_dispatch(model, onload_tensors=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    missing = _missing_keys(report)
    if missing:
        # transformers would serve these as freshly random weights: refuse instead of answering nonsense
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{path} lacks weights the model needs ({shown}); the checkpoint is incomplete")
    model.to(device).eval()
    lm = model.thinker if hasattr(model, "thinker") else model
    text_config = config.get_text_config()
    return LoadedModel(
        model=model,
        lm=lm,
        dtype=torch_dtype,
        device=torch.device(device),
        max_position_embeddings=int(getattr(text_config, "max_position_embeddings", 2048)),
        eos_token_ids=_eos_ids(model),
        accepts_logits_to_keep="logits_to_keep" in inspect.signature(lm.forward).parameters,
    )


@contextlib.contextmanager
def _load_report() -> Iterator[list[str]]:
    """Collect transformers' LOAD REPORT warnings.

    ``output_loading_info=True`` would be the direct route, but Qwen2.5-Omni's ``from_pretrained``
    override breaks with it, so the report transformers logs is read instead.
    """
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _missing_keys(report: list[str]) -> list[str]:
    keys = []
    for message in report:
        message = _ANSI.sub("", message)  # transformers colours the table when stdout is a terminal
        if "LOAD REPORT" not in message:
            continue
        for line in message.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 2 and cells[1] == "MISSING":
                keys.append(cells[0])
    return keys


def _quantized_load_kwargs(config: Any) -> dict[str, Any]:
    """compressed-tensors checkpoints (``omniserve quantize``, llm-compressor) are dequantized at load.

    Left compressed, transformers decompresses them in a forward pre-hook on the top-level model
    only, which never fires when the engine calls an inner module (the Omni thinker: "'Linear' object
    has no attribute 'weight'"), and CPUs have no int4/FP8 matmul for the compressed layers anyway.
    """
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method != "compressed-tensors":
        return {}
    import warnings

    from transformers import CompressedTensorsConfig

    # transformers warns that the passed config's loading attributes override the checkpoint's: intended
    warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def _eos_ids(model: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.extend([eos] if isinstance(eos, int) else list(eos))
    return tuple(dict.fromkeys(ids))


def _rope_delta(lm: Any) -> int | None:
    """The offset multimodal-rope models store after a prefill (positions of text after media)."""
    for module in (lm, getattr(lm, "model", None)):
        delta = getattr(module, "rope_deltas", None) if module is not None else None
        if delta is not None:
            return int(delta.reshape(-1)[0])
    return None


@dataclass
class Prefill:
    cache: Any  # DynamicCache with batch size 1
    logits: Any  # [V] float32 logits of the next token
    length: int  # tokens in the cache
    rope_delta: int | None


def prefill(loaded: LoadedModel, token_ids: list[int], mm_inputs: dict[str, Any]) -> Prefill:
    import torch

    lm = loaded.lm
    if hasattr(lm, "rope_deltas"):
        lm.rope_deltas = None  # never let one request's stored offset leak into the next
    inputs: dict[str, Any] = {}
    for key, value in mm_inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(loaded.device)
            if value.is_floating_point() and key != "video_second_per_grid":
                value = value.to(loaded.dtype)
        inputs[key] = value
    input_ids = torch.tensor([token_ids], dtype=torch.long, device=loaded.device)
    attention_mask = torch.ones_like(input_ids)
    if loaded.accepts_logits_to_keep:
        inputs["logits_to_keep"] = 1
    with torch.inference_mode():
        out = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **inputs)
    return Prefill(
        cache=out.past_key_values,
        logits=out.logits[0, -1].float(),
        length=len(token_ids),
        rope_delta=_rope_delta(lm),
    )


class DecodeBatch:
    """The running sequences' shared KV cache, left-padded to a common length, plus its mask."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self.cache: Any = None
        self.mask: Any = None  # [B, T] 1 = real token
        self.positions: list[int] = []  # next position of each row (text positions)
        self.rope_deltas: list[int | None] = []

    @property
    def size(self) -> int:
        return len(self.positions)

    def add(self, pre: Prefill, copies: int) -> None:
        """Append ``copies`` rows that continue from one prefilled prompt (``n`` choices share it)."""
        import torch
        from transformers import DynamicCache

        new_layers = [
            (layer.keys.repeat(copies, 1, 1, 1), layer.values.repeat(copies, 1, 1, 1)) for layer in pre.cache.layers
        ]
        new_mask = torch.ones(copies, pre.length, dtype=torch.long, device=self._loaded.device)
        if self.cache is None or self.size == 0:
            merged = new_layers
            self.mask = new_mask
        else:
            old_len, new_len = self.mask.shape[1], pre.length
            target = max(old_len, new_len)
            merged = []
            for (ok, ov), (nk, nv) in zip(
                ((layer.keys, layer.values) for layer in self.cache.layers), new_layers, strict=True
            ):
                merged.append(
                    (
                        torch.cat([_left_pad(ok, target), _left_pad(nk, target)], dim=0),
                        torch.cat([_left_pad(ov, target), _left_pad(nv, target)], dim=0),
                    )
                )
            self.mask = torch.cat([_left_pad(self.mask, target, dim=1), _left_pad(new_mask, target, dim=1)], dim=0)
        self.cache = DynamicCache(ddp_cache_data=merged)
        self.positions.extend([pre.length] * copies)
        self.rope_deltas.extend([pre.rope_delta] * copies)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` and cut left padding no remaining row needs."""
        import torch

        if len(rows) == self.size:
            return
        self.positions = [self.positions[i] for i in rows]
        self.rope_deltas = [self.rope_deltas[i] for i in rows]
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self._loaded.device)
        mask = self.mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def step(self, next_tokens: list[int]) -> Any:
        """One decode step for every row; returns [B, V] float32 logits."""
        import torch

        device = self._loaded.device
        input_ids = torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones(self.size, 1, dtype=torch.long, device=device)], dim=1)
        position_ids = torch.tensor(self.positions, dtype=torch.long, device=device)[:, None]
        if any(d is not None for d in self.rope_deltas):
            deltas = torch.tensor([d or 0 for d in self.rope_deltas], dtype=torch.long, device=device)[:, None]
            position_ids = (position_ids + deltas)[None].expand(3, -1, -1)
        with torch.inference_mode():
            out = self._loaded.lm(
                input_ids=input_ids,
                attention_mask=self.mask,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        self.positions = [p + 1 for p in self.positions]
        return out.logits[:, -1].float()


def _left_pad(t: Any, length: int, dim: int = 2) -> Any:
    import torch.nn.functional as F

    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]
    return F.pad(t, pad)
