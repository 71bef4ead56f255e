"""The encoder cache: an image or video met again is not run through the vision tower again.

Models of the Qwen2-VL shape (Qwen2-VL, Qwen2.5-VL, the Qwen2.5-Omni thinker) turn the processor's
patches into embeddings in ``get_image_features(pixel_values, grid_thw)`` / ``get_video_features``,
which the model's forward calls once for all the pass's items (every prompt's, when several media
prompts are prefilled in one pass), and which return one embedding tensor per item
(``pooler_output``). ``attached`` shadows those two methods on the module that owns the tower for
one forward pass: the patches are split per item (``grid_thw`` gives each item's rows), each item is
looked up by a hash of its patches, grid, kind and the LoRA adapter of the pass (a tower adapter
changes the output; a pass's rows share one, ``lora.peft_batch``), and only the missing items go
through the tower, each once, in one call.

Models whose feature methods return more than per-item embeddings (Qwen3-VL's deepstack features)
are passed through uncached, as is audio; the cache is bounded in items, least recently used first.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_METHODS = (("image", "get_image_features"), ("video", "get_video_features"))


class EncoderCache:
    """At most ``capacity`` items' tower outputs; ``tower_calls`` counts the items that were encoded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._passthrough: set[tuple[int, str]] = set()  # (module, method) seen returning more than embeddings
        self.hits = 0  # items served from the cache
        self.encoded = 0  # items run through the tower

    def __len__(self) -> int:
        return len(self._items)

    def drop_adapter(self, name: str) -> None:
        """Forget what was encoded with adapter ``name`` (it was unloaded: its weights may change)."""
        for key in [k for k in self._items if name in k[1]]:
            del self._items[key]

    @contextlib.contextmanager
    def attached(self, lm: Any, adapters: Sequence[str | None]) -> Iterator[None]:
        """For the duration of one forward pass of ``lm``, serve its image/video features from the cache."""
        owner = _tower_owner(lm)
        if owner is None or self.capacity <= 0:
            yield
            return
        shadowed = []
        for kind, name in _METHODS:
            original = getattr(owner, name, None)
            if original is None or (id(owner), name) in self._passthrough:
                continue
            # the distinct adapters of the pass, not one per row: an item encoded in a batch of rows is the
            # same item encoded alone (a tower runs one adapter per pass, ``lora.peft_batch``)
            setattr(owner, name, self._cached(owner, name, kind, original, tuple(dict.fromkeys(adapters))))
            shadowed.append(name)
        try:
            yield
        finally:
            for name in shadowed:
                delattr(owner, name)  # the class's method shows through again

    def _cached(
        self, owner: Any, name: str, kind: str, original: Callable[..., Any], adapters: tuple[str | None, ...]
    ) -> Callable[..., Any]:
        def features(pixels: Any, grid: Any = None, **kwargs: Any) -> Any:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            if grid is None or set(kwargs) - {"return_dict"}:
                return original(pixels, grid, **kwargs)
            rows = grid.prod(-1).tolist()
            items = list(pixels.split(rows))
            keys = [(kind, adapters, _digest(item, grid[i])) for i, item in enumerate(items)]
            # an item met twice in one pass (two prompts of a batch showing one image) is encoded once
            missing = [i for i, key in enumerate(keys) if key not in self._items and key not in keys[:i]]
            if missing:
                import torch

                out = original(torch.cat([items[i] for i in missing]), grid[missing], **kwargs)
                embeds = getattr(out, "pooler_output", None)
                if type(out) is not BaseModelOutputWithPooling or embeds is None or len(embeds) != len(missing):
                    if len(missing) == len(items):  # the model's output has more in it: never cache this method
                        self._passthrough.add((id(owner), name))
                        return out
                    return original(pixels, grid, **kwargs)
                for i, embed in zip(missing, embeds, strict=True):
                    self._items[keys[i]] = embed
                self.encoded += len(missing)
            self.hits += len(items) - len(missing)
            found = []
            for key in keys:
                self._items.move_to_end(key)
                found.append(self._items[key])
            while len(self._items) > max(self.capacity, len(keys)):  # this pass's items stay until it ends
                self._items.popitem(last=False)
            return BaseModelOutputWithPooling(pooler_output=tuple(found))

        return features


def _tower_owner(lm: Any) -> Any:
    """The module whose forward calls the feature methods: the one holding the vision tower."""
    for module in (getattr(lm, "model", None), lm):
        if module is not None and hasattr(module, "visual") and hasattr(module, "get_image_features"):
            return module
    return None


def _digest(item: Any, grid: Any) -> str:
    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(item.shape)}{item.dtype}{grid.tolist()}".encode())
    digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
