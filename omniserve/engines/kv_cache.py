"""A preallocated KV cache for continuous batching: rows come and go without re-padding the batch.

Each layer keeps one key and one value buffer of shape ``[max_rows, kv_heads, capacity, head_dim]``.
Active rows are ``0..rows-1`` (a leaving row is replaced by the last one, so they stay contiguous)
and all of them end at one common column ``end``: a forward pass of ``q`` new tokens per row writes
columns ``end..end+q`` in place, and attention reads the window ``lo..end+q``, where ``lo`` is the
first column any row uses. Rows are left-padded: a row's tokens are ``start..end`` and the 2D mask
(``attention_mask``) hides what lies left of its start, so the model's own attention (SDPA) runs
with the right masks and nothing is concatenated or re-padded per step.

Moving data happens only (a) when a row joins with its prompt (its own columns are copied in) or
leaves (the last row's columns move into its slot), (b) when ``end`` reaches the capacity: the
window is shifted to column 0, and the buffers grow (doubling) if that did not free a quarter of
them, so both are amortized, and (c) when a prompt longer than ``end`` joins: the window shifts right.
Buffers that grew are given back when the cache empties, so memory follows the contexts recently held.

It is a transformers ``Cache``: the model calls ``update`` per layer and asks ``get_seq_length`` /
``get_mask_sizes`` to size its masks; every position is passed explicitly by the caller, so the
column a token sits in never has to equal its position.

Cross-attention layers (Mllama's, ``engines/cross_attention.py``) keep no token columns: each row holds the
keys and values of its own images (tiles x patches, written once by the prefill that encoded them) in a
buffer of their own, ``[max_rows, kv_heads, width, head_dim]``, with the row's vision length and the mask of
the vision columns its later tokens may attend to (``cross_len``, ``cross_masks``; 0 and None for a row
without images, whose columns stay zero). They move with their row when it joins or leaves, like its tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; the bookkeeping (rows, columns) is the owning ``SlotCache``'s."""

    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape_k = (self._owner.max_rows, key_states.shape[1], self._owner.capacity, key_states.shape[-1])
        shape_v = (self._owner.max_rows, value_states.shape[1], self._owner.capacity, value_states.shape[-1])
        # zeros, not empty: masked columns are still multiplied by a zero weight, and garbage could be NaN.
        # Never inference tensors (the first write happens inside a forward pass's inference mode): rows are
        # moved between passes, and torch refuses in-place updates of inference tensors outside that mode.
        with torch.inference_mode(False):
            self.keys = torch.zeros(shape_k, dtype=key_states.dtype, device=key_states.device)
            self.values = torch.zeros(shape_v, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self._owner
        rows, q = key_states.shape[0], key_states.shape[-2]
        if rows != owner.rows:
            raise ValueError(f"a forward pass of {rows} rows on a cache holding {owner.rows}")
        self.keys[:rows, :, owner.end : owner.end + q] = key_states
        self.values[:rows, :, owner.end : owner.end + q] = value_states
        lo = owner.lo
        return self.keys[:rows, :, lo : owner.end + q], self.values[:rows, :, lo : owner.end + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.end - self._owner.lo + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.end - self._owner.lo

    def get_max_length(self) -> int:
        return -1

    def resize(self, capacity: int) -> None:
        """New buffers of ``capacity`` columns holding the old ones' first columns."""
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], old.shape[1], capacity, old.shape[3]))
            keep = min(capacity, old.shape[2])
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)


class _CrossLayer(CacheLayerMixin):
    """One cross-attention layer: each active row's image keys and values, zero past the row's own length.

    ``keys`` / ``values`` are what the model reads at a step without images (transformers' Mllama reads the
    layer's attributes directly): the active rows, as wide as the widest row's images.
    """

    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        self._owner = owner
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        super().__init__()

    # the model reads these; the mixin's ``__init__`` sets them to None, which means nothing here
    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[: self._owner.rows, :, : self._owner.cross_width()]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("a cross-attention layer's keys are written through update()")

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[: self._owner.rows, :, : self._owner.cross_width()]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("a cross-attention layer's values are written through update()")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._reserve(key_states, value_states, key_states.shape[-2])

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Buffers at least ``width`` columns wide, shaped and typed like ``keys`` / ``values``."""
        if self._k is not None and self._k.shape[2] >= width:
            return
        rows = self._owner.max_rows
        with torch.inference_mode(False):  # as ``_SlotLayer``'s: rows are moved between passes
            new_k = torch.zeros((rows, keys.shape[1], width, keys.shape[-1]), dtype=keys.dtype, device=keys.device)
            new_v = torch.zeros(
                (rows, values.shape[1], width, values.shape[-1]), dtype=values.dtype, device=keys.device
            )
        if self._k is not None and self._v is not None:
            new_k[:, :, : self._k.shape[2]] = self._k
            new_v[:, :, : self._v.shape[2]] = self._v
        self._k, self._v = new_k, new_v
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's images, one set per row: every row of the pass gets them (a media prefill's fresh cache)."""
        owner = self._owner
        rows, width = key_states.shape[0], key_states.shape[-2]
        if rows != owner.rows:
            raise ValueError(f"cross-attention states for {rows} rows on a cache holding {owner.rows}")
        self._reserve(key_states, value_states, width)
        assert self._k is not None and self._v is not None
        self._k[:rows, :, :width] = key_states
        self._v[:rows, :, :width] = value_states
        self._k[:rows, :, width:] = 0
        self._v[:rows, :, width:] = 0
        owner.cross_len[:rows] = [width] * rows
        return self._k[:rows, :, :width], self._v[:rows, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._owner.cross_width()

    def get_max_length(self) -> int:
        return -1

    def set_rows(self, first: int, count: int, source: _CrossLayer | None, row: int, width: int) -> None:
        """Rows ``first..first+count`` get ``source`` row ``row``'s first ``width`` columns (zeros when width is 0)."""
        if width and source is not None and source._k is not None and source._v is not None:
            self._reserve(source._k, source._v, width)
        if self._k is None or self._v is None:
            return  # no buffers yet: every row is zero already
        self._k[first : first + count] = 0
        self._v[first : first + count] = 0
        if width and source is not None and source._k is not None and source._v is not None:
            self._k[first : first + count, :, :width] = source._k[row, :, :width]
            self._v[first : first + count, :, :width] = source._v[row, :, :width]

    def move_row(self, last: int, row: int) -> None:
        if self._k is not None and self._v is not None:
            self._k[row] = self._k[last]
            self._v[row] = self._v[last]

    def free(self) -> None:
        self._k, self._v, self.is_initialized = None, None, False


class SlotCache(Cache):
    """``max_rows`` rows of KV for every layer, each row left-padded to end at the common column ``end``.

    The protocol of one forward pass of ``q`` tokens per row: ``reserve(q)``, build the mask with
    ``attention_mask(q)``, run the model with this cache, then ``advance(q)``.
    """

    def __init__(self, num_layers: int, max_rows: int, capacity: int = 256, cross_layers: Collection[int] = ()) -> None:
        self.max_rows = max_rows
        self.capacity = self._initial_capacity = max(1, capacity)
        self.starts: list[int] = []  # first column of each active row
        self.end = 0
        self.cross_len: list[int] = []  # per row: columns of image keys its cross-attention layers hold (0: none)
        self.cross_masks: list[torch.Tensor | None] = []  # per row: vision columns its next tokens may attend to
        layers: list[CacheLayerMixin] = [
            _CrossLayer(self) if i in cross_layers else _SlotLayer(self) for i in range(num_layers)
        ]
        self._token_layers = [layer for layer in layers if isinstance(layer, _SlotLayer)]
        self._cross_layers = [layer for layer in layers if isinstance(layer, _CrossLayer)]
        super().__init__(layers=layers)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def lo(self) -> int:
        """The first column any active row uses (where attention starts reading)."""
        return min(self.starts) if self.starts else self.end

    def tokens(self) -> int:
        """Columns holding real tokens, summed over rows (what ``kv_cache_usage`` reports)."""
        return sum(self.end - s for s in self.starts)

    def slots(self) -> int:
        """Every column every row could hold with the buffers allocated now (none before the first write)."""
        return self.max_rows * self.capacity if self._initialized_layers() else 0

    def _initialized_layers(self) -> list[_SlotLayer]:
        return [layer for layer in self._token_layers if layer.is_initialized]

    def cross_width(self) -> int:
        """Columns the cross-attention layers show for the active rows: the widest row's images (0: none)."""
        return max(self.cross_len, default=0)

    def keep_cross_masks(self, masks: list[torch.Tensor | None]) -> None:
        """After a media prefill of every row here: each row's vision columns its next tokens attend to."""
        if len(masks) != self.rows:
            raise ValueError(f"{len(masks)} cross-attention masks for {self.rows} rows")
        self.cross_masks = list(masks)

    def reserve(self, q: int) -> None:
        """Make room for ``q`` more columns: shift the window to column 0, grow the buffers if still short."""
        if self.end + q <= self.capacity:
            return
        lo = self.lo
        if lo > 0:
            self._move_window(-lo)
        if self.end + q > self.capacity * 3 // 4:  # less than a quarter free after shifting: grow
            self._grow(max(self.end + q, self.capacity + 1))

    def _grow(self, columns: int) -> None:
        """At least ``columns`` columns (doubling, so growth is amortized)."""
        if columns <= self.capacity:
            return
        capacity = max(self.capacity * 2, columns)
        for layer in self._initialized_layers():
            layer.resize(capacity)
        self.capacity = capacity

    def _move_window(self, shift: int) -> None:
        """Move columns ``lo..end`` of every row by ``shift`` (negative: left), keeping each row's end."""
        lo, end = self.lo, self.end
        if self.rows and end > lo:
            for layer in self._initialized_layers():
                for buf in (layer.keys, layer.values):
                    buf[: self.rows, :, lo + shift : end + shift] = buf[: self.rows, :, lo:end].clone()
        self.starts = [s + shift for s in self.starts]
        self.end += shift

    def advance(self, q: int) -> None:
        """After a forward pass: the ``q`` columns written are now part of every row."""
        self.end += q

    def attention_mask(self, q: int, valid: list[int] | None = None, device: Any = None) -> torch.Tensor:
        """The 2D mask ``[rows, end - lo + q]`` of the next forward: 1 where a row has a real token.

        ``valid``: how many of the ``q`` new tokens are real for each row (the rest is right padding,
        used by a prefill chunk whose rows have fewer tokens left than the chunk is wide).
        """
        lo = self.lo
        columns = torch.arange(lo, self.end + q, device=device)[None, :]
        starts = torch.tensor(self.starts, dtype=torch.long, device=device)[:, None]
        mask = columns >= starts
        if valid is not None:
            ends = self.end + torch.tensor(valid, dtype=torch.long, device=device)[:, None]
            mask &= columns < ends
        return mask.long()

    # ------------------------------------------------------------------ rows joining and leaving

    def add_rows(self, count: int) -> None:
        """``count`` empty rows starting at ``end`` (prompts about to be prefilled into this cache)."""
        if self.rows + count > self.max_rows:
            raise ValueError(f"{self.rows + count} rows in a cache of {self.max_rows}")
        for layer in self._cross_layers:
            layer.set_rows(self.rows, count, None, 0, 0)
        self.starts.extend([self.end] * count)
        self.cross_len.extend([0] * count)
        self.cross_masks.extend([None] * count)

    def append_copies(self, source: SlotCache, row: int, first: int, last: int, copies: int) -> None:
        """Append ``copies`` rows holding ``source`` row ``row``'s columns ``first..last`` (a prefilled prompt).

        They end at ``end`` like every row here; if the prompt is longer than ``end``, the window
        shifts right first (what a prompt longer than every running one costs).
        """
        if self.rows + copies > self.max_rows:
            raise ValueError(f"{self.rows + copies} rows in a cache of {self.max_rows}")
        length = last - first
        if length > self.end:
            self._grow(length)
            self._move_window(length - self.end)
        for mine, theirs in zip(self._token_layers, source._token_layers, strict=True):
            if not theirs.is_initialized:
                continue
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
            for buf, src in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                buf[self.rows : self.rows + copies, :, self.end - length : self.end] = src[row, :, first:last]
        width = source.cross_len[row]
        for cross, source_cross in zip(self._cross_layers, source._cross_layers, strict=True):
            cross.set_rows(self.rows, copies, source_cross, row, width)
        self.starts.extend([self.end - length] * copies)
        self.cross_len.extend([width] * copies)
        self.cross_masks.extend([source.cross_masks[row]] * copies)

    def append_prefix(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append one row holding a cached prefix (``prefix_cache``): per layer ``[kv_heads, length, head_dim]``.

        It ends at ``end`` like every row (the window shifts right if the prefix is longer than ``end``);
        the rest of its prompt is prefilled after it, as for a row added empty.
        """
        if self.rows + 1 > self.max_rows:
            raise ValueError(f"{self.rows + 1} rows in a cache of {self.max_rows}")
        length = kv[0][0].shape[1] if kv else 0
        if length > self.end:
            self._grow(length)
            self._move_window(length - self.end)
        for layer, (keys, values) in zip(self._token_layers, kv, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(keys[None], values[None])
            layer.keys[self.rows, :, self.end - length : self.end] = keys
            layer.values[self.rows, :, self.end - length : self.end] = values
        for cross in self._cross_layers:  # a cached prefix never holds images (the engine does not store theirs)
            cross.set_rows(self.rows, 1, None, 0, 0)
        self.starts.append(self.end - length)
        self.cross_len.append(0)
        self.cross_masks.append(None)

    def row_kv(self, row: int, first: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of ``row``'s columns ``first..last`` per self-attention layer (what ``prefix_cache`` keeps)."""
        return [(layer.keys[row, :, first:last], layer.values[row, :, first:last]) for layer in self._token_layers]

    def remove_row(self, row: int) -> None:
        """Drop ``row``; the last row moves into its slot (the caller mirrors that in its own lists)."""
        last = self.rows - 1
        if row != last:
            first = self.starts[last]
            for layer in self._initialized_layers():
                for buf in (layer.keys, layer.values):
                    buf[row, :, first : self.end] = buf[last, :, first : self.end]
            for cross in self._cross_layers:
                cross.move_row(last, row)
            self.starts[row] = first
            self.cross_len[row] = self.cross_len[last]
            self.cross_masks[row] = self.cross_masks[last]
        self.starts.pop()
        self.cross_len.pop()
        self.cross_masks.pop()
        if not self.starts:
            self.end = 0  # empty: start again at column 0
            for cross in self._cross_layers:  # images' keys are sized by the last batch's images: let them go
                cross.free()
            if self.capacity > self._initial_capacity:  # and give back what a long context made it grow to
                for layer in self._token_layers:
                    layer.keys, layer.values, layer.is_initialized = None, None, False
                self.capacity = self._initial_capacity

    # ------------------------------------------------------------------ Cache protocol

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if isinstance(self.layers[layer_idx], _CrossLayer):
            return self.cross_width()  # 0: no row holds images, and the model skips the layer
        return self.end - self.lo

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.end - self.lo + query_length, 0

    def get_max_length(self) -> int:
        return -1
