"""Batches for the trainer: padded rows of single samples, or packed rows of several samples.

Media tensors from processors are mostly flat in prompt order (image patches of every image one
after another, one row per audio clip), and the model scatters them into the placeholder tokens
in reading order, so a batch simply concatenates them sample after sample; a dimension past the first
that differs between samples (audio frames, images per sample, tiles) is zero-padded to the batch's
largest, as processors pad their own batches. A processor that lays media out one row per sample, with
a per-token mask over them (``ROW_MASKS``: Mllama's ``cross_attention_mask`` [1, tokens, images, tiles]
beside ``pixel_values`` [1, images, tiles, C, H, W]), gets one row per sample in every media tensor:
the mask padded along tokens as ``input_ids`` are, a sample without media an all-zero row (it sees no
tile), so each row's tokens see only their own sample's tiles. Per-token processor
outputs (``TOKEN_ALIGNED_INPUTS``: Qwen2-VL's ``mm_token_type_ids``, which its multimodal positions
need) are laid out like ``input_ids`` instead, 0 (text) where a sample has none or is padding.

Packing puts several samples in one row with no attention mask: the model builds a block-diagonal
causal mask from position ids that restart at 0 for each sample (transformers' packed-sequence
detection), so a token never attends across samples. Multimodal-rotary models (Qwen2-VL family,
Qwen2.5-Omni) need their 3-D (time, height, width) positions too: each sample's are computed by
the model's own ``get_rope_index`` as if it stood alone, and the text positions are prepended as
a 4th row, the layout these models read for packed input. The first label of every sample is
ignored so no sample is trained to predict the next one's first token.

Some models cannot take certain inputs together in one forward pass (``Family.exclusive_media``):
``plan_batches`` groups samples (or packs) so that no batch holds two of them, keeping the data order
otherwise; the trainer then takes one planned group a step (``GroupedCollator``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from omniserve.templates.training import IGNORE_INDEX, TOKEN_ALIGNED_INPUTS
from omniserve.train.features import Sample

#: Per-token masks over a sample's media, laid out ``[1, tokens, ...]``: where a batch has one, the processor lays
#: every media tensor out one row per sample, and the batch's media keep that layout (``merge_media``).
ROW_MASKS = frozenset({"cross_attention_mask"})


def merge_media(samples: Sequence[Sample], width: int | None = None) -> dict[str, Any]:
    """The samples' media tensors, joined along dim 0; any later dimension that differs is zero-padded.

    ``width``: the batch's padded token count, for media laid out one row per sample (``ROW_MASKS``):
    then every sample gets a row, zeros where it has no media. Packed rows (``width`` None) cannot hold them.
    """
    keys = [key for key in dict.fromkeys(k for s in samples for k in s.mm_inputs) if key not in TOKEN_ALIGNED_INPUTS]
    rows = any(key in ROW_MASKS for key in keys)
    if rows and width is None:
        raise ValueError(
            f"media laid out one row per sample ({', '.join(sorted(ROW_MASKS & set(keys)))}) cannot be packed; "
            "train without --packing"
        )
    merged: dict[str, Any] = {}
    for key in keys:
        parts = [s.mm_inputs.get(key) for s in samples]
        present = [p for p in parts if p is not None]
        if not rows:
            parts = present  # flat media: a sample without this input adds nothing
        shape = [max(p.shape[d] for p in present) for d in range(1, present[0].dim())]
        if key in ROW_MASKS:
            shape[0] = width  # type: ignore[call-overload]  # tokens, as input_ids are padded
        merged[key] = _cat_padded(parts, shape, present[0])
    return merged


def _cat_padded(parts: Sequence[Any], shape: Sequence[int], like: Any) -> Any:
    """``parts`` zero-padded to ``[len, *shape]`` each and concatenated; a None part is one row of zeros."""
    import torch

    padded = []
    for part in parts:
        if part is None:
            padded.append(like.new_zeros((1, *shape)))
        elif tuple(part.shape[1:]) == tuple(shape):
            padded.append(part)
        else:
            out = part.new_zeros((part.shape[0], *shape))
            out[tuple(slice(0, n) for n in part.shape)] = part
            padded.append(out)
    return torch.cat(padded, dim=0)


class PaddingCollator:
    """One sample per row, right-padded; the model derives positions from the attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        import torch

        width = max(len(s) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        per_token = {key: torch.zeros((len(samples), width), dtype=torch.long) for key in token_aligned_keys(samples)}
        for row, sample in enumerate(samples):
            n = len(sample)
            input_ids[row, :n] = torch.tensor(sample.input_ids)
            labels[row, :n] = torch.tensor(sample.labels)
            attention_mask[row, :n] = 1
            for key, values in per_token.items():
                values[row, :n] = token_aligned(sample, key)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **per_token,
            **merge_media(samples, width),
        }


class PositionPlanner:
    """Per-sample position ids, computed by the model's own code, for packed rows.

    ``rope_index`` is the model's ``get_rope_index`` for multimodal-rotary models, else None
    (plain 1-D positions).
    """

    def __init__(self, rope_index: Callable[..., Any] | None) -> None:
        self.rope_index = rope_index
        self._params = set(inspect.signature(rope_index).parameters) if rope_index is not None else set()

    @classmethod
    def for_model(cls, model: Any) -> PositionPlanner:
        base = getattr(model, "get_base_model", lambda: model)()  # see through a peft wrapper
        for owner in (base, getattr(base, "model", None)):
            rope_index = getattr(owner, "get_rope_index", None) if owner is not None else None
            if callable(rope_index):
                return cls(rope_index)
        if hasattr(base, "rope_deltas") or hasattr(getattr(base, "model", None), "rope_deltas"):
            raise ValueError("this model uses multimodal positions but exposes no get_rope_index; cannot pack it")
        return cls(None)

    @property
    def multimodal(self) -> bool:
        return self.rope_index is not None

    def positions(self, sample: Sample) -> Any:
        """(3, n) multimodal positions of ``sample`` alone, or (n,) text positions."""
        import torch

        n = len(sample)
        if self.rope_index is None:
            return torch.arange(n)
        mm = sample.mm_inputs
        ids = torch.tensor([sample.input_ids])
        candidates: dict[str, Any] = {
            "input_ids": ids,
            "image_grid_thw": mm.get("image_grid_thw"),
            "video_grid_thw": mm.get("video_grid_thw"),
            "attention_mask": torch.ones_like(ids),
            "use_audio_in_video": False,
            "audio_seqlens": _audio_lengths(mm),
            "mm_token_type_ids": token_aligned(sample, "mm_token_type_ids")[None],
            "second_per_grids": mm.get("video_second_per_grid"),
            "second_per_grid_ts": mm.get("video_second_per_grid"),
        }
        with torch.no_grad():
            position_ids, _ = self.rope_index(**{k: v for k, v in candidates.items() if k in self._params})
        return position_ids[:, 0, :]


class PackingCollator:
    """Rows of several samples each (a ``pack``); padding at a row's end is its own ignored sequence."""

    def __init__(self, pad_token_id: int, planner: PositionPlanner) -> None:
        self.pad_token_id = pad_token_id
        self.planner = planner

    def __call__(self, packs: list[list[Sample]]) -> dict[str, Any]:
        import torch

        rows = [self._row(pack) for pack in packs]
        width = max(r[0].shape[0] for r in rows)
        samples = [s for pack in packs for s in pack]
        per_token = {key: torch.zeros((len(rows), width), dtype=torch.long) for key in token_aligned_keys(samples)}
        for row, pack in enumerate(packs):
            for key, values in per_token.items():
                packed = torch.cat([token_aligned(sample, key) for sample in pack])
                values[row, : packed.shape[0]] = packed
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        depth = 4 if self.planner.multimodal else 1
        positions = torch.zeros((depth, len(rows), width), dtype=torch.long)
        for row, (ids, lab, pos) in enumerate(rows):
            n = ids.shape[0]
            input_ids[row, :n], labels[row, :n], positions[:, row, :n] = ids, lab, pos
            positions[:, row, n:] = torch.arange(width - n)  # the padding restarts at 0: a separate sequence
        position_ids = positions if self.planner.multimodal else positions[0]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            # transformers builds the per-sample mask from positions only when no KV cache is being filled
            "use_cache": False,
            **per_token,
            **merge_media(samples),
        }

    def _row(self, pack: list[Sample]) -> tuple[Any, Any, Any]:
        import torch

        ids, labels, positions = [], [], []
        for sample in pack:
            sample_labels = torch.tensor(sample.labels)
            sample_labels[0] = IGNORE_INDEX  # never learn to predict across a sample boundary
            ids.append(torch.tensor(sample.input_ids))
            labels.append(sample_labels)
            text = torch.arange(len(sample))
            if self.planner.multimodal:
                positions.append(torch.cat([text[None], self.planner.positions(sample)], dim=0))
            else:
                positions.append(text[None])
        return torch.cat(ids), torch.cat(labels), torch.cat(positions, dim=1)


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into packs of at most ``max_length`` tokens (first-fit decreasing).

    Deterministic: ties keep the input order, and every pack lists its samples in input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = lengths[index]
        if length > max_length:
            raise ValueError(f"sample {index} has {length} tokens, more than the pack size {max_length}")
        for p, free in enumerate(room):
            if length <= free:
                packs[p].append(index)
                room[p] -= length
                break
        else:
            packs.append([index])
            room.append(max_length - length)
    return [sorted(pack) for pack in packs]


def exclusive_kinds(media: frozenset[str], exclusive: frozenset[str]) -> frozenset[str]:
    """Which of the inputs one forward pass takes only one of (``Family.exclusive_media``) a sample holds.

    ``media``: the sample's media kinds ("image", "video", "audio"); a sample without any counts as "text".
    """
    return (media or frozenset({"text"})) & exclusive


def plan_batches(media: Sequence[frozenset[str]], batch_size: int, exclusive: frozenset[str]) -> list[list[int]]:
    """Group item indices (samples, or packs) into batches of at most ``batch_size`` where no batch holds two of the
    ``exclusive`` inputs.

    Items are taken in order; each joins the earliest batch still open to it (none of ``exclusive``, or the same
    one), else starts a new batch, so without conflicts the batches are the consecutive runs of the data order.
    Deterministic; an item holding two ``exclusive`` inputs itself raises (training refuses it when loading data).
    """
    batches: list[list[int]] = []
    kinds: list[str | None] = []  # each batch's exclusive input, None while it holds none
    open_: list[int] = []  # indices into ``batches`` of those not yet full, oldest first
    for index, item in enumerate(media):
        held = exclusive_kinds(item, exclusive)
        if len(held) > 1:
            raise ValueError(f"sample {index} holds {' and '.join(sorted(held))}, which one forward pass cannot take")
        kind = next(iter(held), None)
        batch = next((b for b in open_ if kind is None or kinds[b] in (None, kind)), None)
        if batch is None:
            batch = len(batches)
            batches.append([])
            kinds.append(None)
            open_.append(batch)
        batches[batch].append(index)
        kinds[batch] = kinds[batch] or kind
        if len(batches[batch]) >= batch_size:
            open_.remove(batch)
    return batches


def plan_packs_apart(
    lengths: Sequence[int], media: Sequence[frozenset[str]], max_length: int, exclusive: frozenset[str]
) -> list[list[int]]:
    """``plan_packs`` within each exclusive input's samples (and those holding none), so no pack mixes two."""
    classes: dict[str | None, list[int]] = {}
    for index, item in enumerate(media):
        classes.setdefault(next(iter(sorted(exclusive_kinds(item, exclusive))), None), []).append(index)
    packs = [
        [members[i] for i in pack]
        for members in classes.values()
        for pack in plan_packs([lengths[i] for i in members], max_length)
    ]
    return sorted(packs, key=lambda pack: pack[0])


class GroupedCollator:
    """Batches planned ahead (``plan_batches``): the trainer hands over one group a step, ``inner`` collates it."""

    def __init__(self, inner: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.inner = inner

    def __call__(self, groups: list[list[Any]]) -> dict[str, Any]:
        return self.inner([item for group in groups for item in group])


def token_aligned_keys(samples: Sequence[Sample]) -> list[str]:
    """The per-token processor outputs any of ``samples`` carries."""
    return [key for key in dict.fromkeys(k for s in samples for k in s.mm_inputs) if key in TOKEN_ALIGNED_INPUTS]


def token_aligned(sample: Sample, key: str) -> Any:
    """``sample``'s per-token ``key`` as a 1-D tensor; zeros (text) when the processor gave none (no media)."""
    import torch

    value = sample.mm_inputs.get(key)
    return value.reshape(-1).long() if value is not None else torch.zeros(len(sample), dtype=torch.long)


def _audio_lengths(mm: dict[str, Any]) -> Any:
    mask = mm.get("feature_attention_mask")
    return mask.sum(-1) if mask is not None else None
