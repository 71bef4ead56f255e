"""The encoder cache: an image, video or audio clip met again is not run through its tower again.

Image and video towers are reached through the model's ``get_image_features`` / ``get_video_features``, which its
forward calls once for all the pass's items (every prompt's, when several media prompts are prefilled in one pass)
and whose ``pooler_output`` holds the embeddings: one tensor per item (a list or tuple) or one tensor with the items
along dimension 0. ``attached`` shadows those two methods on the module that owns them for one forward pass. What a
call is cut into is read from its arguments only, never from the family (``_FeatureCall``): items along the pixel
argument's first dimension (or a grid's rows of flattened patches), each with its rows of the other tensor arguments
(``image_sizes``, pixel masks); a unit is an item, or a prompt's items where the method is told how many images each
prompt has. Each unit is looked up by a hash of its pixels, its rows, the call's other arguments, the kind and the
LoRA adapter of the pass (a tower adapter changes the output; a pass's rows share one, ``lora.peft_batch``), and
only the missing units go through the tower, each once: in one call whose output is cut per unit where it holds one
embedding per item, else one call per unit (Idefics3: a prompt's row of padded images gives its real tiles'
embeddings, a count the call's items do not predict). Covered so: Qwen2-VL, Qwen2.5-VL, the Qwen2.5-Omni thinker,
Qwen3-VL and the Qwen3-Omni thinker (with their DeepStack rows, below), GLM-4.1V, LLaVA-1.5, LLaVA-NeXT-Video,
LLaVA-OneVision, Gemma 3, Gemma 3n, Idefics3/SmolVLM, InternVL, Mistral 3 (Pixtral). A unit is encoded with the
other missing units of its pass rather than with the pass's every item, so this relies on the towers being
batch-invariant (each item's features its own, as the batched prefill already does;
tests/test_encoder_cache_families.py checks answers against the uncached engine). Pixels a batch pads to its largest
item (LLaVA-NeXT/OneVision tiles, Pixtral heights and widths, Idefics3 images per prompt; ``hf_model._join_media``)
hash apart from the same image prefilled alone: a miss, never a wrong hit.

Not cached, on purpose: Phi-4-multimodal has no feature method (its image embedding module runs inside the token
embedding, with crops and masks), and its tower is not batch-invariant (a crop's features change with another
crop's masked patches in the same call), so a unit encoded apart would differ; Mllama calls its vision model in the
forward itself, with per-tile aspect-ratio ids and masks, and its output becomes cross-attention states that
``cross_attention`` keeps per row for the whole generation, not embeddings placed at placeholders.

Audio is cached the same way, one item per clip of the Whisper-style features (``input_features``
``[clips, mel, frames]`` with ``feature_attention_mask`` saying which frames are real), keyed by a hash of
the values and count of the clip's real frames (what the feature extractor made of its samples with its
options: sampling rate, mel bins, hop), so two clips of one length share an entry only if their features are
equal. Two shapes of
model are known: the Qwen2.5-Omni thinker encodes in ``get_audio_features(input_features,
feature_attention_mask)``, returning every clip's frames concatenated (``last_hidden_state``, split per clip
by the tower's own ``_get_feat_extract_output_lengths``); Qwen2-Audio calls its ``audio_tower`` directly
with clips padded to one fixed length and a per-clip attention mask, returning ``[clips, frames, hidden]``:
there the tower's ``forward`` is shadowed, each clip keyed by its features and its mask row.

Qwen3-VL's and Qwen3-Omni's feature methods also return DeepStack features: one tensor per fed decoder layer,
every item's rows concatenated in the embeddings' order (``deepstack_features``). An item's entry then holds its
embeddings and its rows of each of those tensors (``_Deep``), cut by the item's embedding count, and a pass
served from the cache gets them joined back in its items' order. Models whose feature methods return anything else
besides the tower's own states, or whose audio tower does not say how long each clip's output is, are passed
through uncached (found out at their first call, whose output is used as is); the cache is bounded in items,
least recently used first. Qwen3-Omni's audio lengths come from the function its modeling module keeps beside
the tower (``_output_lengths``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_METHODS = (("image", "get_image_features"), ("video", "get_video_features"))


class _Passthrough(Exception):
    """The tower's output cannot be split per item: this pass gets the original's output (``result``, when the call
    that found out had every item of the pass: it is that output; else None, call the original again)."""

    def __init__(self, result: Any = None) -> None:
        super().__init__("passthrough")
        self.result = result


@dataclasses.dataclass(frozen=True)
class _Deep:
    """One item's embeddings and its rows of each DeepStack layer's features (Qwen3-VL, Qwen3-Omni)."""

    embed: Any
    layers: tuple[Any, ...]


class EncoderCache:
    """At most ``capacity`` items' tower outputs; ``hits``: items served from it, ``encoded``: items encoded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._passthrough: set[tuple[int, str]] = set()  # (module, method) seen returning more than embeddings
        self._alone: set[tuple[int, str]] = set()  # (module, method) whose output does not split: one call per unit
        # (module, method) -> (its output type, its embeddings' container: list, tuple or None for one tensor,
        # whether its items carry DeepStack rows)
        self._shapes: dict[tuple[int, str], tuple[type, type | None, bool]] = {}
        self.hits = 0  # items served from the cache
        self.encoded = 0  # items run through the tower
        # inside a shadowed method's original: feature methods it calls itself (Qwen3-VL's get_video_features calls
        # get_image_features) are the tower at work, not items of their own
        self._encoding = False

    def __len__(self) -> int:
        return len(self._items)

    def drop_adapter(self, name: str) -> None:
        """Forget what was encoded with adapter ``name`` (it was unloaded: its weights may change)."""
        for key in [k for k in self._items if name in k[1]]:
            del self._items[key]

    @contextlib.contextmanager
    def attached(self, lm: Any, adapters: Sequence[str | None]) -> Iterator[None]:
        """For the duration of one forward pass of ``lm``, serve its image/video/audio features from the cache."""
        if self.capacity <= 0:
            yield
            return
        # the distinct adapters of the pass, not one per row: an item encoded in a batch of rows is the
        # same item encoded alone (a tower runs one adapter per pass, ``lora.peft_batch``)
        distinct = tuple(dict.fromkeys(adapters))
        shadowed: list[tuple[Any, str]] = []
        owner = _tower_owner(lm)
        for kind, name in _METHODS if owner is not None else ():
            original = getattr(owner, name, None)
            if original is None or (id(owner), name) in self._passthrough:
                continue
            setattr(owner, name, self._cached(owner, name, kind, original, distinct))
            shadowed.append((owner, name))
        audio = _audio_owner(lm)
        if audio is not None:
            module, name = audio
            if (id(module), name) not in self._passthrough:
                wrap = self._cached_audio_features if name == "get_audio_features" else self._cached_audio_tower
                setattr(module, name, wrap(module, name, getattr(module, name), distinct))
                shadowed.append((module, name))
        try:
            yield
        finally:
            for module, name in shadowed:
                delattr(module, name)  # the class's method shows through again

    def _lookup(self, keys: list[tuple[Any, ...]], encode: Callable[[list[int]], list[Any]]) -> list[Any]:
        """Every key's tower output: those missing encoded in one call (``encode(indices)``), all kept, LRU order.

        Raises ``_Passthrough`` (from ``encode``) when the tower's output cannot be split per item."""
        # an item met twice in one pass (two prompts of a batch showing one image) is encoded once
        missing = [i for i, key in enumerate(keys) if key not in self._items and key not in keys[:i]]
        if missing:
            for i, embed in zip(missing, encode(missing), strict=True):
                self._items[keys[i]] = embed
            self.encoded += len(missing)
        self.hits += len(keys) - len(missing)
        found = []
        for key in keys:
            self._items.move_to_end(key)
            found.append(self._items[key])
        while len(self._items) > max(self.capacity, len(keys)):  # this pass's items stay until it ends
            self._items.popitem(last=False)
        return found

    def _cached(
        self, owner: Any, name: str, kind: str, original: Callable[..., Any], adapters: tuple[str | None, ...]
    ) -> Callable[..., Any]:
        """``original`` (``get_image_features`` / ``get_video_features`` of ``owner``), each unit of a call
        (``_FeatureCall``) served from the cache, only the missing units encoded: in one call where its output splits
        per unit, else one call per unit (learned at the first call that did not split)."""
        signature = inspect.signature(original)
        method = (id(owner), name)

        def features(*args: Any, **kwargs: Any) -> Any:
            call = _FeatureCall.parse(signature, args, kwargs) if not self._encoding else None
            if call is None:
                return original(*args, **kwargs)
            keys = [(kind, adapters, digest) for digest in call.digests()]

            def run(units: list[int]) -> Any:
                self._encoding = True
                try:
                    return original(**call.subset(units))
                finally:
                    self._encoding = False

            def alone(unit: int) -> Any:
                return self._pooled(method, run([unit]), whole=False)

            def encode(missing: list[int]) -> list[Any]:
                whole = len(missing) == len(keys)
                if method in self._alone:
                    return [alone(u) for u in missing]
                out = run(missing)
                chunks = _split(self._pooled(method, out, whole), [len(call.units[u]) for u in missing])
                if chunks is not None:
                    return chunks
                # more or fewer outputs than items (Idefics3: a prompt's real tiles): from now on one call per unit
                self._alone.add(method)
                if whole:
                    raise _Passthrough(out)
                return [alone(u) for u in missing]

            try:
                found = self._lookup(keys, encode)
            except _Passthrough as passed:
                return passed.result if passed.result is not None else original(*args, **kwargs)
            shape, container, deep = self._shapes[method]
            # every other field None (a tower's own output type may require its states: timm's for Gemma 3n)
            empty = {field.name: None for field in dataclasses.fields(shape)}
            pooled = _combine(found, container)
            if not deep:
                return shape(**{**empty, "pooler_output": pooled})
            import torch

            items: list[_Deep] = list(pooled)
            layers = [torch.cat([item.layers[layer] for item in items]) for layer in range(len(items[0].layers))]
            embeds = (container or list)(item.embed for item in items)
            return shape(**{**empty, "pooler_output": embeds, "deepstack_features": layers})

        return features

    def _pooled(self, method: tuple[int, str], out: Any, whole: bool) -> Any:
        """The per-item embeddings (``pooler_output``) of a feature method's output, its output type noted for passes
        served wholly from the cache; with DeepStack features, per-item ``_Deep`` entries. Raises ``_Passthrough``
        (and never caches the method again) when the output has more in it than the tower's own states and DeepStack
        features that cut per item: what the forward reads of it is unknown."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.utils import ModelOutput

        pooled = getattr(out, "pooler_output", None)
        extra = set(out.keys()) if isinstance(out, ModelOutput) else {"not a model output"}
        extra -= {"last_hidden_state", "pooler_output", "hidden_states", "attentions"}
        deep = _deep_items(pooled, out.deepstack_features) if extra == {"deepstack_features"} else None
        if (extra and deep is None) or not isinstance(pooled, (list, tuple, _tensor_type())):
            self._passthrough.add(method)
            raise _Passthrough(out if whole else None)
        # the output type, where it has a field for the embeddings (Idefics3's and Pixtral's towers return a
        # ``BaseModelOutput`` the method sets ``pooler_output`` on as an attribute)
        shape = (
            type(out) if "pooler_output" in {f.name for f in dataclasses.fields(out)} else BaseModelOutputWithPooling
        )
        self._shapes[method] = (shape, type(pooled) if isinstance(pooled, (list, tuple)) else None, deep is not None)
        return pooled if deep is None else type(pooled)(deep)

    def _cached_audio_features(
        self, owner: Any, name: str, original: Callable[..., Any], adapters: tuple[str | None, ...]
    ) -> Callable[..., Any]:
        """``get_audio_features(input_features, feature_attention_mask, ...)`` per clip (Qwen2.5-Omni's shape)."""

        def audio_features(features: Any, mask: Any = None, lengths: Any = None, **kwargs: Any) -> Any:
            import torch

            if mask is None or lengths is not None or features.ndim != 3 or set(kwargs) - {"return_dict"}:
                return original(features, mask, lengths, **kwargs)
            real = mask.bool()
            keys = [("audio", adapters, _digest(features[i][:, real[i]])) for i in range(features.shape[0])]
            kept: list[Any] = []

            def encode(missing: list[int]) -> list[Any]:
                out = original(features[missing], mask[missing], None, **kwargs)
                hidden = getattr(out, "last_hidden_state", None)
                sizes = _output_lengths(owner, real[missing].sum(-1))
                if list(out.keys()) != ["last_hidden_state"] or sizes is None or hidden.shape[0] != sum(sizes):
                    if len(missing) == len(keys):
                        self._passthrough.add((id(owner), name))
                        raise _Passthrough(out)
                    raise _Passthrough
                kept.append(out)
                return list(hidden.split(sizes))

            try:
                found = self._lookup(keys, encode)
            except _Passthrough as passed:
                return passed.result if passed.result is not None else original(features, mask, lengths, **kwargs)
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            shape = type(kept[0]) if kept else BaseModelOutputWithPooling
            return shape(last_hidden_state=torch.cat(found))

        return audio_features

    def _cached_audio_tower(
        self, tower: Any, name: str, original: Callable[..., Any], adapters: tuple[str | None, ...]
    ) -> Callable[..., Any]:
        """The audio tower's ``forward(input_features, attention_mask)`` per clip (Qwen2-Audio's shape: clips padded
        to one length, a ``[clips, ...]`` mask, ``[clips, frames, hidden]`` out): a clip's key holds its mask row."""

        def forward(features: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
            import torch

            n = features.shape[0]
            if kwargs or features.ndim != 3 or (attention_mask is not None and attention_mask.shape[0] != n):
                return original(features, attention_mask, **kwargs)
            rows = [(features[i],) if attention_mask is None else (features[i], attention_mask[i]) for i in range(n)]
            keys = [("audio", adapters, _digest(*row)) for row in rows]
            kept: list[Any] = []

            def encode(missing: list[int]) -> list[Any]:
                out = original(features[missing], None if attention_mask is None else attention_mask[missing])
                hidden = getattr(out, "last_hidden_state", None)
                if list(out.keys()) != ["last_hidden_state"] or hidden.shape[0] != len(missing):
                    if len(missing) == n:
                        self._passthrough.add((id(tower), name))
                        raise _Passthrough(out)
                    raise _Passthrough
                kept.append(out)
                return list(hidden)

            try:
                found = self._lookup(keys, encode)
            except _Passthrough as passed:
                return passed.result if passed.result is not None else original(features, attention_mask, **kwargs)
            from transformers.modeling_outputs import BaseModelOutput

            shape = type(kept[0]) if kept else BaseModelOutput
            return shape(last_hidden_state=torch.stack(found))

        return forward


def _tower_owner(lm: Any) -> Any:
    """The module whose forward calls the feature methods (the model inside ``*ForConditionalGeneration``, or the
    Omni thinker itself). Models without them (Mllama, Phi-4-multimodal) have none: their images are not cached."""
    for module in (getattr(lm, "model", None), lm):
        if module is not None and any(hasattr(module, name) for _, name in _METHODS):
            return module
    return None


class _FeatureCall:
    """One call of a feature method, cut into units: what one cache entry holds.

    The items are what the method's first argument (the pixels) holds along dimension 0 (an image, a tile or crop, a
    video, or an Idefics3 prompt's padded images), or, beside an integer ``[items, 3]`` grid whose rows' products
    count the pixel rows (Qwen2-VL-style flattened patches), one grid row's patches. Every other tensor argument must
    hold one row per item (``image_sizes``, ``pixel_attention_mask``), or be integer counts of items that add up to
    their number (LLaVA-OneVision's ``batch_num_images``, images per prompt: whether an image is tiled depends on
    it): then a unit is one count's items, keyed and encoded together, else a unit is one item. Anything else (a
    tensor of another length, tensors inside other values, ``return_dict=False``) and the call is not cached.
    A unit's key is a hash of its items' pixels and rows of the other tensors, and of the call's other arguments.
    """

    def __init__(
        self,
        arguments: dict[str, Any],
        pixels: str,
        bounds: list[int],
        grid: str | None,
        rows: list[str],
        counts: str | None,
        units: list[list[int]],
    ) -> None:
        self.arguments = arguments
        self.pixels = pixels  # the name of the pixel argument
        self.bounds = bounds  # item i's pixels: rows bounds[i]:bounds[i + 1] of the pixel argument
        self.grid = grid  # the grid argument's name (flattened patches), else None
        self.rows = rows  # the names of the tensors holding one row per item (the grid included)
        self.counts = counts  # the name of the items-per-unit counts, else None
        self.units = units  # each unit's items, in order

    @classmethod
    def parse(cls, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _FeatureCall | None:
        """The call's units, or None where it does not cut into units (it is then not cached)."""
        import torch

        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                return None
            arguments.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        pixels = next(iter(signature.parameters))
        values = arguments.get(pixels)
        if arguments.get("return_dict", True) is not True or not isinstance(values, torch.Tensor) or values.ndim < 2:
            return None
        others = {k: v for k, v in arguments.items() if k != pixels}
        if any(_holds_tensor(v) for v in others.values() if not isinstance(v, torch.Tensor)):
            return None
        tensors = {k: v for k, v in others.items() if isinstance(v, torch.Tensor)}
        grid = next(
            (
                k
                for k, v in tensors.items()
                if v.ndim == 2
                and v.shape[1] == 3
                and not v.is_floating_point()
                and int(v.prod(-1).sum()) == len(values)
            ),
            None,
        )
        sizes = [int(n) for n in tensors[grid].prod(-1).tolist()] if grid is not None else [1] * len(values)
        items = len(sizes)
        rows, counts = [], None
        for k, v in tensors.items():
            if v.ndim > 0 and v.shape[0] == items:
                rows.append(k)
            elif counts is None and v.ndim == 1 and not v.is_floating_point() and int(v.sum()) == items:
                counts = k
            else:
                return None
        per_unit = [int(n) for n in tensors[counts].tolist()] if counts is not None else [1] * items
        if min(per_unit, default=0) < 1:
            return None
        starts = [sum(per_unit[:u]) for u in range(len(per_unit))]
        units = [list(range(start, start + n)) for start, n in zip(starts, per_unit, strict=True)]
        bounds = [sum(sizes[:i]) for i in range(items + 1)]
        return cls(arguments, pixels, bounds, grid, rows, counts, units)

    def digests(self) -> list[str]:
        """Each unit's key: its items' pixels and rows, the call's other arguments (the feature layer, say)."""
        options = repr(
            sorted((k, repr(v)) for k, v in self.arguments.items() if k not in {self.pixels, *self.rows, self.counts})
        )
        options += f"{self.counts};{sorted(self.rows)}"
        values = self.arguments[self.pixels]
        return [
            _digest(
                *(values[self.bounds[i] : self.bounds[i + 1]] for i in unit),
                *(self.arguments[k][i] for k in self.rows for i in unit),
                label=f"{options};{len(unit)}",
            )
            for unit in self.units
        ]

    def subset(self, units: list[int]) -> dict[str, Any]:
        """The call's arguments for ``units`` alone, in their order."""
        import torch

        items = [i for u in units for i in self.units[u]]
        arguments = dict(self.arguments)
        values = arguments[self.pixels]
        if self.grid is not None:
            arguments[self.pixels] = torch.cat([values[self.bounds[i] : self.bounds[i + 1]] for i in items])
        else:
            arguments[self.pixels] = values[items]
        for k in self.rows:
            arguments[k] = arguments[k][items]
        if self.counts is not None:
            counts = arguments[self.counts]
            arguments[self.counts] = torch.tensor([len(self.units[u]) for u in units], dtype=counts.dtype).to(
                counts.device
            )
        return arguments


def _split(pooled: Any, sizes: list[int]) -> list[Any] | None:
    """``pooled`` (the embeddings of units of ``sizes`` items) cut per unit; None: it holds neither one unit's
    embeddings nor one per item (its count says nothing about which are whose)."""
    if len(sizes) == 1:
        return [pooled if not isinstance(pooled, (list, tuple)) else list(pooled)]
    if len(pooled) != sum(sizes):
        return None
    starts = [sum(sizes[:u]) for u in range(len(sizes) + 1)]
    chunks = [pooled[starts[u] : starts[u + 1]] for u in range(len(sizes))]
    return chunks if not isinstance(pooled, (list, tuple)) else [list(chunk) for chunk in chunks]


def _combine(chunks: list[Any], container: type | None) -> Any:
    """Units' embeddings as the method returns them for all: one tensor along dimension 0, or a list or tuple."""
    import torch

    if container is None:
        return torch.cat(chunks)
    return container(embed for chunk in chunks for embed in chunk)


def _deep_items(pooled: Any, layers: Any) -> list[_Deep] | None:
    """Each item's embeddings with its rows of every DeepStack layer (which concatenate the items' rows in the
    embeddings' order); None when they do not cut so (then the method is not cached)."""
    if not isinstance(pooled, (list, tuple)) or not isinstance(layers, (list, tuple)) or not layers:
        return None
    sizes = [int(embed.shape[0]) for embed in pooled]
    if any(not isinstance(layer, _tensor_type()) or layer.shape[0] != sum(sizes) for layer in layers):
        return None
    rows = [layer.split(sizes) for layer in layers]
    return [_Deep(embed, tuple(cut[i] for cut in rows)) for i, embed in enumerate(pooled)]


def _holds_tensor(value: Any) -> bool:
    """Whether a non-tensor argument holds tensors (a list of per-image sizes, say): such calls are not cut."""
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) or isinstance(v, _tensor_type()) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) or isinstance(v, _tensor_type()) for v in value.values())
    return False


def _tensor_type() -> type:
    import torch

    return torch.Tensor


def _audio_owner(lm: Any) -> tuple[Any, str] | None:
    """What to shadow for audio: (module, method name): the owner's ``get_audio_features`` where the forward calls
    it, else the audio tower's own ``forward`` (the model calls the tower directly)."""
    for module in (getattr(lm, "model", None), lm):
        tower = getattr(module, "audio_tower", None) if module is not None else None
        if tower is None:
            continue
        if hasattr(module, "get_audio_features"):
            # only the Whisper-style shape is known: ([clips, mel, frames], feature_attention_mask). Gemma 3n's
            # (input_features [clips, frames, mel], input_features_mask True on padding) goes through uncached
            parameters = inspect.signature(module.get_audio_features).parameters
            return (module, "get_audio_features") if "feature_attention_mask" in parameters else None
        return tower, "forward"
    return None


def _output_lengths(owner: Any, frames: Any) -> list[int] | None:
    """Each clip's encoded length, from the tower's own arithmetic (None: the tower does not say): its method
    (Qwen2.5-Omni), or the function of the same name its modeling module keeps beside it, with the tower's window
    (Qwen3-Omni's chunked encoder). A wrong length is caught where it is used: the lengths must add up to the output."""
    import sys

    tower = getattr(owner, "audio_tower", None)
    compute = getattr(tower, "_get_feat_extract_output_lengths", None)
    if compute is None:
        function = getattr(sys.modules.get(type(tower).__module__), "_get_feat_extract_output_lengths", None)
        window = getattr(getattr(tower, "config", None), "n_window", None)
        if function is None or not isinstance(window, int):
            return None
        lengths = function(frames, window)
        return [int(n) for n in lengths.reshape(-1).tolist()]
    lengths = compute(frames)
    lengths = lengths[-1] if isinstance(lengths, tuple) else lengths  # (after the convolutions, after pooling)
    return [int(n) for n in lengths.reshape(-1).tolist()]


def _digest(*tensors: Any, label: str = "") -> str:
    """A hash of the tensors' shapes, dtypes and bytes (an item's patches and grid, a clip's frames and mask), and of
    ``label`` (a feature call's other arguments)."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(label.encode())
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
