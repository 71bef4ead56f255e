"""Models whose images reach the decoder through cross-attention layers (Mllama / Llama 3.2 Vision).

Such a model has no image tokens to cache: a few decoder layers attend to the image's keys and values
(tiles x patches per image), and the processor's per-token ``cross_attention_mask`` (``[1, tokens,
images, tiles]``) says which tiles each token may see. transformers' model prepares that mask for the
whole sequence and slices out the pass's tokens by the cache's length, which suits ``generate()``'s one
sequence but not a batch of rows at different lengths. So, per forward pass (``attached``):

- a media prefill (a fresh cache, the processor's mask among the inputs) runs as transformers runs it:
  the cross-attention layers write each row's image keys and values into the cache
  (``kv_cache._CrossLayer``), and each row's last token's mask is kept with its row, widened from tiles
  to the vision columns (``SlotCache.cross_masks``): every later token of the row attends as that token
  did (what ``generate()`` does by repeating the mask's last row);
- any other pass (decode steps, text prefill chunks) gets, for each row, that kept mask as the additive
  mask over the batch's vision columns and the "row sees some image" factor, handed straight to the
  decoder (``full_text_row_masked_out_mask``), so nothing ``tokens x vision columns`` large is built.
  A row without images attends to nothing: its columns are zero, the factor is 0, so the layer leaves
  it exactly as skipping the layer would (transformers skips them for a text-only sequence);
- a pass where no row holds images changes nothing: the cache reports no cross-attention length and the
  model skips those layers, as it does for a text-only sequence.

Detected from the model: its text config names ``cross_attention_layers`` and one of its modules takes the
prepared masks (``full_text_row_masked_out_mask``); no family names itself here. Prompts with images do not
use the prefix cache (the engine neither stores nor reuses them): with cross-attention, even the tokens
before an image depend on it (transformers lets a token that sees no tile attend evenly to all of them).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omniserve.errors import ModelLoadError

if TYPE_CHECKING:
    from omniserve.engines.kv_cache import SlotCache

#: The processor output holding the per-token mask over images and tiles, and the decoder's argument names.
MASK_KEY = "cross_attention_mask"
ROWS_KEY = "full_text_row_masked_out_mask"


@dataclass(frozen=True)
class CrossAttention:
    """What the engine needs of a cross-attention model: which layers, and the module taking the masks."""

    layers: frozenset[int]
    decoder: Any = field(repr=False)  # the module whose forward takes the two prepared masks


def detect(lm: Any) -> CrossAttention | None:
    """The model's cross-attention layers (None for a model without them)."""
    config = getattr(lm, "config", None)
    text_config = config.get_text_config() if config is not None else None
    layers = getattr(text_config, "cross_attention_layers", None)
    if not layers:
        return None
    for module in lm.modules():
        params = inspect.signature(module.forward).parameters
        if MASK_KEY in params and ROWS_KEY in params and "past_key_values" in params:
            return CrossAttention(frozenset(int(i) for i in layers), module)
    raise ModelLoadError(
        f"{type(lm).__name__} declares cross-attention layers {list(layers)} but none of its modules takes "
        f"{MASK_KEY} and {ROWS_KEY}: omniserve cannot give its decode steps their masks"
    )


@contextlib.contextmanager
def attached(
    cross: CrossAttention | None, cache: SlotCache, q: int, keep: Sequence[int], media: Mapping[str, Any], lm: Any
) -> Iterator[None]:
    """Around one forward pass of ``q`` tokens per row of ``lm`` on ``cache``: see the module docstring."""
    if cross is None:
        yield
        return
    token_masks = media.get(MASK_KEY)
    if token_masks is not None:  # a media prefill: the model reads the processor's mask itself
        yield
        cache.keep_cross_masks([_columns(token_masks[b, k], cache.cross_len[b]) for b, k in enumerate(keep)])
        return
    if cache.cross_width() == 0:  # no row holds images: the model skips the layers
        yield
        return
    mask, rows = decode_masks(cache, q, lm.dtype)  # the dtype transformers prepares its masks in

    def hand_masks(
        module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs[MASK_KEY], kwargs[ROWS_KEY] = mask, rows
        return args, kwargs

    handle = cross.decoder.register_forward_pre_hook(hand_masks, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _columns(tiles: Any, width: int) -> Any:
    """One token's ``[images, tiles]`` mask as a bool mask over the row's ``width`` vision columns (each tile's
    patches in turn, as the model lays its keys out)."""
    cells = tiles.reshape(-1)
    if width == 0 or width % cells.numel():
        raise ValueError(f"{width} image keys do not split into the mask's {cells.numel()} tiles")
    return cells.bool().repeat_interleave(width // cells.numel())


def decode_masks(cache: SlotCache, q: int, dtype: Any) -> tuple[Any, Any]:
    """The pass's ``[rows, 1, q, width]`` additive mask and ``[rows, 1, q, 1]`` factor, as transformers prepares
    them (``_prepare_cross_attention_mask``): a row attending to no column gets a zero mask (attends evenly)
    and a factor of 0; every token of a row attends like the row's kept mask."""
    import torch

    width = cache.cross_width()
    device = next((m.device for m in cache.cross_masks if m is not None), None)
    allowed = torch.zeros((cache.rows, width), dtype=torch.bool, device=device)
    for row, columns in enumerate(cache.cross_masks):
        if columns is not None:
            allowed[row, : columns.numel()] = columns
    sees = allowed.any(dim=-1)
    additive = torch.zeros((cache.rows, width), dtype=dtype, device=device)
    additive.masked_fill_(~allowed & sees[:, None], torch.finfo(dtype).min)
    mask = additive[:, None, None, :].expand(-1, 1, q, -1)
    rows = sees.to(dtype)[:, None, None, None].expand(-1, 1, q, 1)
    return mask, rows
