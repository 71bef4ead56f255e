"""Loading a transformers checkpoint and running its forward passes: prefill chunks, media prefills, decode steps.

Continuous batching needs one thing ``generate()`` does not offer: sequences that join and leave
a running batch. Every language-model pass goes through ``forward`` (one place to add per-row
options later) on a ``kv_cache.SlotCache``: text prompts are prefilled together, in chunks, on one
cache; prompts with media are prefilled whole, several in one pass when their processor outputs
join into one batch (``media_layout``; the model computes their multimodal positions itself, per
row), else alone; decode steps run on the cache holding every running sequence. Models with
multimodal rotary positions (Qwen2-VL family) get explicit per-row positions from the offsets they
report after a media prefill (0 for text).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omniserve.engines.encoder_cache import EncoderCache
    from omniserve.engines.fast_linear import LinearKernel
    from omniserve.engines.kv_cache import SlotCache


@dataclass
class LoadedModel:
    model: Any  # the full model as loaded (kept for its config and weights)
    lm: Any  # the module that maps (input_ids, media) -> logits; the thinker for Omni checkpoints
    dtype: Any
    device: Any
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    accepts_logits_to_keep: bool = False
    mrope: bool = False  # multimodal rotary positions: text positions are given as [3, B, q]
    num_layers: int = 0
    linear_kernel: str = "torch"  # what the linear layers compute with (engines/fast_linear.py)
    cross_attention: Any = None  # ``cross_attention.CrossAttention`` of a model whose images enter that way (Mllama)


def load_model(
    path: Path, *, dtype: str = "float32", device: str = "cpu", linear_kernel: LinearKernel = "auto"
) -> LoadedModel:
    """Load ``path`` for serving (``models.loading`` does the loading); refuse it if weights are missing.

    ``linear_kernel`` (``--linear-kernel``): packs the linear layers for oneDNN here, before the warm-up."""
    import torch

    from omniserve.engines.cross_attention import detect as detect_cross_attention
    from omniserve.engines.fast_linear import apply_linear_kernel
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
    compute_dtype = lm.get_input_embeddings().weight.dtype  # the served dtype (quantized layers hold ints)
    kernel = apply_linear_kernel(model, linear_kernel, compute_dtype, torch.device(device))
    return LoadedModel(
        model=model,
        lm=lm,
        dtype=checkpoint.dtype,
        device=torch.device(device),
        max_position_embeddings=int(getattr(text_config, "max_position_embeddings", 2048)),
        eos_token_ids=_eos_ids(model),
        accepts_logits_to_keep="logits_to_keep" in inspect.signature(lm.forward).parameters,
        mrope=any(hasattr(m, "rope_deltas") for m in (lm, getattr(lm, "model", None)) if m is not None),
        # KV-shared layers (Gemma 3n's last ``num_kv_shared_layers``) never write a cache of their own: they read the
        # keys and values the last unshared layer of their kind returns in the same pass (transformers' DynamicCache
        # leaves them out too). Cache rows for them would stay empty, and the prefix cache reads every row.
        num_layers=int(text_config.num_hidden_layers) - int(getattr(text_config, "num_kv_shared_layers", 0) or 0),
        linear_kernel=kernel,
        cross_attention=detect_cross_attention(lm),
    )


def _eos_ids(model: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.extend([eos] if isinstance(eos, int) else list(eos))
    return tuple(dict.fromkeys(ids))


def _rope_deltas(lm: Any, rows: int) -> list[int] | None:
    """The offset per row that multimodal-rope models store after a prefill (positions of text after media).

    The model keeps them as ``[B, 1]``, one per batch row; a single value stands for every row."""
    for module in (lm, getattr(lm, "model", None)):
        delta = getattr(module, "rope_deltas", None) if module is not None else None
        if delta is not None:
            values = [int(d) for d in delta.reshape(-1).tolist()]
            if len(values) == 1:
                return values * rows
            if len(values) != rows:
                raise ValueError(f"the model reported {len(values)} rope offsets for {rows} rows")
            return values
    return None


def placeholder_ids(loaded: LoadedModel) -> frozenset[int]:
    """The token ids the model replaces with media embeddings (image, video, audio placeholders)."""
    names = ("image_token_id", "video_token_id", "audio_token_id")
    found: set[int] = set()
    for config in (getattr(loaded.lm, "config", None), getattr(loaded.model, "config", None)):
        for name in (*names, *(n.replace("_id", "_index") for n in names)):
            value = getattr(config, name, None) if config is not None else None
            if isinstance(value, int):
                found.add(value)
    return frozenset(found)


#: Processor outputs holding one row per prompt along its tokens (Qwen2-VL's and GLM-4.1V's ``mm_token_type_ids``,
#: Gemma 3's ``token_type_ids``, which the model reads to let an image's tokens attend to each other both ways):
#: joined by right-padding every prompt's row to the batch's width with 0, "text", which the 2D mask then hides.
_ROW_KEYS = frozenset({"mm_token_type_ids", "token_type_ids"})
#: Processor outputs holding the prompt's media items along dimension 0 (flattened patches, one grid row
#: per image/video, per-video times, whole images, each image's size, a prompt's image count): a batch's are
#: the prompts' concatenated in row order, which is the order the model consumes them in (placeholders are
#: filled row after row). Items must agree in every other dimension: LLaVA-NeXT-Video's and LLaVA-OneVision's
#: ``pixel_values_videos`` (``[videos, frames, C, H, W]``) join only videos of one frame count, since the model
#: reshapes the whole batch's frame features with one count (padding frames would add features no placeholder
#: takes). A key known nowhere here (Mllama's aspect-ratio and cross-attention masks, say) is not known to join:
#: such a prompt is prefilled alone.
_ITEM_KEYS = frozenset(
    {
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "video_second_per_grid",  # Qwen2.5-Omni
        "second_per_grid_ts",  # Qwen2.5-VL
        "image_sizes",  # LLaVA-NeXT/OneVision, Pixtral: [images, 2], each image's real height and width
        "batch_num_images",  # LLaVA-OneVision: [prompts], how many images each prompt has
    }
)
#: Processor outputs holding the prompt's audio clips along dimension 0, each padded along the last (time)
#: dimension to the prompt's longest clip, with the mask saying which frames are real (Whisper-style features):
#: a batch's are right-padded with zeros (masked out) to the batch's longest clip, then concatenated in row
#: order, which is what the processor itself writes for several clips.
_PADDED_ITEM_KEYS = frozenset({"input_features", "feature_attention_mask"})
#: Pixel masks: which pixels (or patches) of each image or tile are real, ``[items, (tiles,) H, W]``. Padded along
#: every dimension past 0: with zeros (not real) within an image (height, width), with ones for whole padded tiles,
#: as the processors pad their own batches: such a tile is blank and dropped by the model (by its count or its
#: all-zero pixels), and a tower never sees a tile with no real patch.
_PIXEL_MASK_KEYS = frozenset({"pixel_attention_mask"})
#: Processor outputs that tell the model the real extent of every ``pixel_values`` item, so that zero padding beyond
#: it is cropped or dropped again by the model: ``image_sizes`` (LLaVA-NeXT/OneVision keep each image's first tiles,
#: as many as its size makes, Pixtral crops each image's patch grid to its size) and ``pixel_attention_mask``
#: (Idefics3/SmolVLM drop all-zero images and mask padded pixels; its tower computes each image alone, masks or
#: not). With one of them, the pixel tensors (``_PIXEL_KEYS``, ``[items, (tiles,) C, H, W]``) are padded with zeros
#: along every dimension past 0 but the channels (tiles or images per item, height, width) to the batch's largest,
#: as the processor pads a batch itself. Phi-4-multimodal's ``image_pixel_values`` / ``image_attention_mask`` follow
#: the same pattern but are left out on purpose: its vision tower (transformers 5.17) gives a crop without masked
#: patches other features when another crop of the same call has some (max |diff| 4.9 on the tiny tower; Idefics3's:
#: 0), so a prompt joined with one whose image fills its crops partly would answer differently: it is prefilled alone.
_EXTENT_KEYS = frozenset({"image_sizes", *_PIXEL_MASK_KEYS})
_PIXEL_KEYS = frozenset({"pixel_values"})


def _padded_dims(key: str, value: Any, keys: Any) -> tuple[int, ...] | None:
    """The dimensions of ``value`` (processor output ``key`` beside ``keys``) a batch pads; None: not a padded key."""
    if key in _PADDED_ITEM_KEYS and value.ndim >= 2:
        return (value.ndim - 1,)
    if key in _PIXEL_MASK_KEYS and value.ndim >= 3:
        return tuple(range(1, value.ndim))
    if key in _PIXEL_KEYS and value.ndim >= 4 and _EXTENT_KEYS & set(keys):
        return tuple(d for d in range(1, value.ndim) if d != value.ndim - 3)
    return None


def media_layout(mm_inputs: dict[str, Any]) -> dict[str, tuple[Any, ...]] | None:
    """What a prompt's processor outputs must share with others' to be prefilled in one pass with them.

    Per key: its kind (row, items or padded items), its shape past dimension 0 (``None`` where a batch pads)
    and its dtype. ``None``: a key that is not known to join (or not a tensor), so the prompt goes alone. Two
    layouts join when they are equal (``layouts_join``): the same keys, so image prompts join image prompts
    and video prompts video prompts (GLM-4.1V marks video frames with the image placeholder and tells them
    apart by token type: its image-only and video-only rows must not share a pass).
    """
    import torch

    layout: dict[str, tuple[Any, ...]] = {}
    for key, value in mm_inputs.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            return None
        padded = _padded_dims(key, value, mm_inputs)
        if key in _ROW_KEYS and value.ndim == 2 and value.shape[0] == 1:
            layout[key] = ("row", value.dtype)
        elif padded is not None:
            shape = tuple(None if d in padded else value.shape[d] for d in range(1, value.ndim))
            layout[key] = ("padded items", shape, value.dtype)
        elif key in _ITEM_KEYS:
            layout[key] = ("items", tuple(value.shape[1:]), value.dtype)
        else:
            return None
    return layout


def layouts_join(a: dict[str, tuple[Any, ...]] | None, b: dict[str, tuple[Any, ...]] | None) -> bool:
    """Whether two prompts' ``media_layout`` allow one prefill pass."""
    return a is not None and a == b


def new_cache(loaded: LoadedModel, max_rows: int, capacity: int = 256) -> SlotCache:
    """An empty preallocated cache for ``max_rows`` sequences (buffers are made at the first write)."""
    from omniserve.engines.kv_cache import SlotCache

    layers = loaded.cross_attention.layers if loaded.cross_attention is not None else ()
    return SlotCache(loaded.num_layers, max_rows, capacity, cross_layers=layers)


def forward(
    loaded: LoadedModel,
    input_ids: Any,
    attention_mask: Any,
    position_ids: Any,
    cache: SlotCache,
    rows: Sequence[object],
    keep: list[int],
    encoder_cache: EncoderCache | None = None,
    **media: Any,
) -> Any:
    """The one language-model forward pass: ``[B, q]`` tokens on ``cache``; ``[B, V]`` float32 logits.

    ``rows``: what each batch row is, in batch order (the engine passes each row's ``GenerationRequest``,
    ``None`` for its warm-up): per-row options (adapters) hook in here. ``keep[b]``: the column
    (0..q-1) whose logits row ``b`` needs. ``position_ids`` ``None`` lets the model compute them (a
    media prefill); ``[B, q]`` text positions are widened to the 3 rotary sections for multimodal-rope
    models. The caller does ``cache.reserve`` before and ``cache.advance`` after. ``encoder_cache``: image
    and video features are looked up there (and kept) rather than always computed by the tower.
    """
    import torch

    if len(rows) != input_ids.shape[0]:
        raise ValueError(f"{len(rows)} rows named for a batch of {input_ids.shape[0]}")
    if position_ids is not None and loaded.mrope and position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    wanted = sorted(set(keep))
    extra: dict[str, Any] = dict(media)
    if loaded.accepts_logits_to_keep:
        # only the columns some row needs go through the LM head: one for a decode step
        q = input_ids.shape[1]
        extra["logits_to_keep"] = 1 if wanted == [q - 1] else torch.tensor(wanted, device=loaded.device)
        columns = [wanted.index(k) for k in keep]
    else:
        columns = keep
    from omniserve.engines import cross_attention
    from omniserve.lora.peft_batch import adapter_names, per_row

    names = adapter_names(rows)
    encoders = encoder_cache.attached(loaded.lm, names) if encoder_cache is not None and media else nullcontext()
    # each row's LoRA adapter (None: the base) applied inside this one pass; a no-op when none is loaded
    crossing = cross_attention.attached(loaded.cross_attention, cache, input_ids.shape[1], keep, media, loaded.lm)
    with per_row(loaded.lm, names), encoders, crossing, torch.inference_mode():
        out = loaded.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
    if len(set(columns)) == 1:  # a decode step, or rows whose pieces end together: a plain slice
        return out.logits[:, columns[0]].float()
    batch = torch.arange(input_ids.shape[0], device=out.logits.device)
    return out.logits[batch, torch.tensor(columns, device=out.logits.device)].float()


def prefill_chunk(
    loaded: LoadedModel, cache: SlotCache, pieces: list[list[int]], offsets: list[int], rows: Sequence[object]
) -> Any:
    """One chunk of text prompts, one piece per cache row; the logits after each piece's last token.

    ``offsets[b]``: the position of ``pieces[b][0]`` (tokens of the prompt already in the cache).
    Pieces shorter than the chunk are right-padded, their padding masked out.
    """
    import torch

    width = max(len(p) for p in pieces)
    device = loaded.device
    input_ids = torch.zeros(len(pieces), width, dtype=torch.long, device=device)
    for b, piece in enumerate(pieces):
        input_ids[b, : len(piece)] = torch.tensor(piece, dtype=torch.long)
    positions = torch.tensor(offsets, dtype=torch.long, device=device)[:, None] + torch.arange(width, device=device)
    cache.reserve(width)
    mask = cache.attention_mask(width, [len(p) for p in pieces], device=device)
    logits = forward(loaded, input_ids, mask, positions, cache, rows, [len(p) - 1 for p in pieces])
    cache.advance(width)
    return logits


def prefill_alone(
    loaded: LoadedModel,
    cache: SlotCache,
    token_ids: list[int],
    mm_inputs: dict[str, Any],
    rows: Sequence[object],
    encoder_cache: EncoderCache | None = None,
) -> tuple[Any, int | None]:
    """A whole prompt with its media on an empty one-row ``cache``: the next token's ``[V]`` logits and
    the multimodal-rope offset the model reports (``None`` for models without one)."""
    logits, deltas = prefill_media(loaded, cache, [token_ids], [mm_inputs], rows, encoder_cache)
    return logits[0], None if deltas is None else deltas[0]


def prefill_media(
    loaded: LoadedModel,
    cache: SlotCache,
    prompts: Sequence[list[int]],
    mm_inputs: Sequence[dict[str, Any]],
    rows: Sequence[object],
    encoder_cache: EncoderCache | None = None,
) -> tuple[Any, list[int] | None]:
    """Whole prompts with their media, one per row of an empty ``cache``, in one pass: ``[B, V]`` logits
    of each prompt's next token and the multimodal-rope offset of each (``None``: the model has none).

    Rows start at column 0 and are right-padded to the longest (masked, like a text chunk's), so the
    2D mask lines up with ``input_ids`` and the model computes each row's positions from its own
    tokens and media. The prompts' ``media_layout`` must join (``layouts_join``); row ``b``'s KV is
    then columns ``0..len(prompts[b])`` of the cache.
    """
    import torch

    lm = loaded.lm
    for module in (lm, getattr(lm, "model", None)):
        if module is not None and hasattr(module, "rope_deltas"):
            module.rope_deltas = None  # never let one pass's stored offsets leak into the next
    width = max(len(p) for p in prompts)
    inputs = _join_media(mm_inputs, width) if len(prompts) > 1 else dict(mm_inputs[0])
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(loaded.device)
            if value.is_floating_point() and key != "video_second_per_grid":
                value = value.to(loaded.dtype)
        inputs[key] = value
    taken = placeholder_ids(loaded)  # padding must never count as a media placeholder
    pad = next(i for i in range(len(taken) + 1) if i not in taken)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=loaded.device)
    for b, prompt in enumerate(prompts):
        input_ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    cache.add_rows(len(prompts))
    cache.reserve(width)
    mask = cache.attention_mask(width, [len(p) for p in prompts], device=loaded.device)
    keep = [len(p) - 1 for p in prompts]
    logits = forward(loaded, input_ids, mask, None, cache, rows, keep, encoder_cache, **inputs)
    cache.advance(width)
    return logits, _rope_deltas(lm, len(prompts))


def _join_media(mm_inputs: Sequence[dict[str, Any]], width: int) -> dict[str, Any]:
    """The prompts' processor outputs as one batch's (``media_layout``'s rules): items concatenated in row
    order (padded items first right-padded with zeros to the batch's largest along their padded dimensions:
    audio clips to the longest, pixel tiles and sizes to the most and largest), per-token rows right-padded
    with zeros to ``width``."""
    import torch

    joined: dict[str, Any] = {}
    for key in dict.fromkeys(k for inputs in mm_inputs for k in inputs):
        if key in _ROW_KEYS:
            padded = []
            for inputs in mm_inputs:
                row = inputs[key]
                padded.append(torch.nn.functional.pad(row, (0, width - row.shape[1])))
            joined[key] = torch.cat(padded)
        elif (dims := _padded_dims(key, mm_inputs[0][key], mm_inputs[0])) is not None:
            items = [inputs[key] for inputs in mm_inputs if key in inputs]
            largest = [max(item.shape[d] for item in items) for d in range(items[0].ndim)]
            grown = []
            # a pixel mask's tile dimensions (those before height and width) are padded with ones, the rest with zeros
            tiles = set(range(1, items[0].ndim - 2)) if key in _PIXEL_MASK_KEYS else set()
            for item in items:
                for value, padded in ((0, set(dims) - tiles), (1, set(dims) & tiles)):
                    pads: list[int] = []  # F.pad's order: (last dim's left, right, the one before's left, right, ...)
                    for d in reversed(range(1, item.ndim)):
                        pads += [0, largest[d] - item.shape[d] if d in padded else 0]
                    item = torch.nn.functional.pad(item, pads, value=value)
                grown.append(item)
            joined[key] = torch.cat(grown)
        else:
            joined[key] = torch.cat([inputs[key] for inputs in mm_inputs if key in inputs])
    return joined


def decode_step(
    loaded: LoadedModel, cache: SlotCache, tokens: list[int], positions: list[int], rows: Sequence[object]
) -> Any:
    """One new token per cache row at ``positions`` (rope offsets included); ``[B, V]`` logits."""
    import torch

    device = loaded.device
    input_ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
    position_ids = torch.tensor(positions, dtype=torch.long, device=device)[:, None]
    cache.reserve(1)
    mask = cache.attention_mask(1, device=device)
    logits = forward(loaded, input_ids, mask, position_ids, cache, rows, [0])
    cache.advance(1)
    return logits
