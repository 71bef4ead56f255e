"""Loading a transformers checkpoint and running its two kinds of forward pass: prefill and decode.

Continuous batching needs one thing ``generate()`` does not offer: sequences that join and leave
a running batch. So each prompt is prefilled alone (with its media), and decode steps run on one
left-padded KV cache holding every running sequence. Models with multimodal rotary positions
(Qwen2-VL family) get explicit per-row positions from the offset they report after prefill.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    """Load ``path`` for serving (``models.loading`` does the loading); refuse it if weights are missing."""
    import torch

    from omniserve.models.loading import generating_module, load_checkpoint, refuse_missing

    checkpoint = load_checkpoint(path, dtype=dtype, device=None)
    refuse_missing(path, checkpoint.report)
    model = checkpoint.model
    if checkpoint.dequantized and checkpoint.dtype != "auto":
        # layers quantization left alone (lm_head, the towers) load in the dtype they were saved in, the
        # dequantized ones in the asked dtype: serve in one dtype, or the first matmul across them fails
        model.to(checkpoint.dtype)
    if getattr(model, "has_talker", False):
        model.disable_talker()  # text is all the engine makes; speech/ loads its own talker when it speaks
    model.to(device).eval()
    lm = generating_module(model)
    text_config = checkpoint.config.get_text_config()
    return LoadedModel(
        model=model,
        lm=lm,
        dtype=checkpoint.dtype,
        device=torch.device(device),
        max_position_embeddings=int(getattr(text_config, "max_position_embeddings", 2048)),
        eos_token_ids=_eos_ids(model),
        accepts_logits_to_keep="logits_to_keep" in inspect.signature(lm.forward).parameters,
    )


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
