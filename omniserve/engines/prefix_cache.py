"""Prefix caching for the transformers engine: prompts that share a prefix reuse its KV.

A bounded store (``--prefix-cache-tokens``) of KV blocks, kept as a tree: each node holds up to
``block`` tokens and a copy of their keys and values for every layer, and its parent is the block
before it. A node is found by its parent, its exact token ids and its *salt*: the request's LoRA
adapter (an adapter changes the KV) and, for every block that reaches the prompt's first media
placeholder, a content hash of all the prompt's media (``media_digest``: the processor's tensors,
grids included). Two different images behind identical placeholder tokens therefore never share a
block; blocks wholly before any media are shared with text prompts (their KV does not depend on
media, and multimodal-rope positions of text before media are plain indexes).

Matching is token-granular: full blocks are followed exactly, then the longest common prefix with one
child block is used (the KV of a block's first ``k`` tokens depends only on them). At most
``len(prompt) - 1`` tokens are reused, so the last prompt token is always computed (its logits start
the answer). The engine's rule for media prompts (``transformers_engine``): reuse only a prefix that
holds every media placeholder of the prompt, so what is left to compute is plain text at positions
``index + rope_delta`` (the offset stored with the node, the same for the same media); otherwise the
prompt is prefilled whole, as without the cache, and stored for the next one.

Eviction is least-recently-used over leaves: a lookup or store touches its chain from the leaf up, so
a parent is always more recent than its children and the oldest node is a leaf.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``(keys, values)`` per layer, each ``[kv_heads, tokens, head_dim]``
LayerKV = list[tuple[Any, Any]]


def media_digest(mm_inputs: Mapping[str, Any]) -> str | None:
    """A content hash of a prompt's processed media (every tensor the processor made, with its shape and
    dtype, so the processing options are part of it); ``None`` for a prompt without media."""
    if not mm_inputs:
        return None
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(mm_inputs):
        value = mm_inputs[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    salt: tuple[Any, ...]
    parent: _Node | None
    kv: LayerKV
    rope_delta: int = 0
    children: dict[tuple[Any, ...], _Node] = field(default_factory=dict)  # (salt, tokens) -> child


@dataclass
class PrefixMatch:
    """What a lookup found: ``length`` tokens reusable, from ``nodes`` (the last maybe in part)."""

    length: int
    nodes: list[_Node]
    rope_delta: int = 0


@dataclass
class PrefixKey:
    """How one prompt's blocks are salted: its adapter, and its media (from ``first_media`` on)."""

    adapter: str | None = None
    media: str | None = None
    first_media: int | None = None  # index of the first media placeholder token

    def salt(self, start: int, end: int) -> tuple[Any, ...]:
        """The salt of the block holding tokens ``start..end``."""
        reaches_media = self.first_media is not None and end > self.first_media
        return (self.adapter, self.media if reaches_media else None)


class PrefixCache:
    """At most ``capacity`` tokens of cached prefix KV in blocks of ``block`` tokens; LRU over leaves."""

    def __init__(self, capacity: int, block: int = 64) -> None:
        self.capacity = capacity
        self.block = block
        self._root = _Node((), (), None, [])
        self._lru: collections.OrderedDict[int, _Node] = collections.OrderedDict()
        self.tokens = 0  # tokens held

    def __len__(self) -> int:
        return len(self._lru)

    # ------------------------------------------------------------------ lookup

    def match(self, tokens: list[int], key: PrefixKey, limit: int | None = None) -> PrefixMatch:
        """The longest cached prefix of ``tokens`` (at most ``limit`` tokens, default all but the last)."""
        limit = len(tokens) - 1 if limit is None else min(limit, len(tokens) - 1)
        node, done, chain = self._root, 0, []
        while done < limit:
            piece = tuple(tokens[done : done + self.block])
            salt = key.salt(done, done + len(piece))
            child = node.children.get((salt, piece)) if len(piece) == self.block else None
            if child is not None:
                chain.append(child)
                done += len(piece)
                node = child
                continue
            best, best_len = None, 0  # no exact full block: the child sharing the longest start
            for (child_salt, child_tokens), candidate in node.children.items():
                if child_salt != salt:
                    continue
                common = _common(child_tokens, piece)
                if common > best_len:
                    best, best_len = candidate, common
            if best is not None:
                chain.append(best)
                done += best_len
            break
        length = min(done, limit)
        self._touch(chain)
        return PrefixMatch(length, chain, chain[-1].rope_delta if chain else 0)

    def load(self, match: PrefixMatch) -> LayerKV:
        """The matched prefix's keys and values per layer, ``[kv_heads, match.length, head_dim]`` each."""
        import torch

        if not match.nodes:
            return []
        layers = len(match.nodes[0].kv)
        out: LayerKV = []
        for layer in range(layers):
            keys = torch.cat([n.kv[layer][0] for n in match.nodes], dim=1)[:, : match.length]
            values = torch.cat([n.kv[layer][1] for n in match.nodes], dim=1)[:, : match.length]
            out.append((keys, values))
        return out

    # ------------------------------------------------------------------ store

    def store(
        self,
        tokens: list[int],
        key: PrefixKey,
        kv_of: Callable[[int, int], LayerKV],
        rope_delta: int = 0,
    ) -> int:
        """Keep the KV of ``tokens`` (``kv_of(first, last)``: views of columns ``first..last``); the blocks
        already held are only touched. Returns the tokens newly stored."""
        if self.capacity <= 0 or not tokens:
            return 0
        tokens = tokens[: self.capacity // self.block * self.block or self.capacity]  # what could stay at all
        node, chain, added = self._root, [], 0
        for start in range(0, len(tokens), self.block):
            piece = tuple(tokens[start : start + self.block])
            salt = key.salt(start, start + len(piece))
            child = node.children.get((salt, piece))
            if child is None and len(piece) < self.block:
                # a partial tail: held already if a child starts with it; a shorter leaf tail gives way to it
                for (child_salt, child_tokens), candidate in list(node.children.items()):
                    if child_salt != salt:
                        continue
                    if _common(child_tokens, piece) == len(piece):
                        child = candidate
                        break
                    shorter = len(child_tokens) < len(piece) and _common(child_tokens, piece) == len(child_tokens)
                    if shorter and not candidate.children:
                        self._drop(candidate)
            if child is None:
                if len(piece) > self.capacity:
                    break
                kv = [(k.clone(), v.clone()) for k, v in kv_of(start, start + len(piece))]
                reaches_media = key.first_media is not None and start + len(piece) > key.first_media
                child = _Node(piece, salt, node, kv, rope_delta if reaches_media else 0)
                node.children[(salt, piece)] = child
                self._lru[id(child)] = child
                self.tokens += len(piece)
                added += len(piece)
            chain.append(child)
            if len(child.tokens) < self.block:
                break
            node = child
        self._touch(chain)
        self._evict(keep=set(map(id, chain)))
        return added

    def drop_adapter(self, name: str) -> None:
        """Forget every block computed with adapter ``name`` (it was unloaded: its weights may change)."""
        for node in [n for n in self._lru.values() if n.salt and n.salt[0] == name]:
            if id(node) in self._lru:
                self._drop_subtree(node)

    def clear(self) -> None:
        self._root.children.clear()
        self._lru.clear()
        self.tokens = 0

    # ------------------------------------------------------------------ bookkeeping

    def _touch(self, chain: list[_Node]) -> None:
        for node in reversed(chain):  # leaf first: a parent ends up more recent than its children
            if id(node) in self._lru:
                self._lru.move_to_end(id(node))

    def _evict(self, keep: set[int]) -> None:
        while self.tokens > self.capacity:
            victim = next((n for i, n in self._lru.items() if not n.children and i not in keep), None)
            if victim is None:
                victim = next((n for n in self._lru.values() if not n.children), None)
            if victim is None:
                return
            self._drop(victim)

    def _drop(self, node: _Node) -> None:
        if node.parent is not None:
            node.parent.children.pop((node.salt, node.tokens), None)
        if self._lru.pop(id(node), None) is not None:
            self.tokens -= len(node.tokens)

    def _drop_subtree(self, node: _Node) -> None:
        for child in list(node.children.values()):
            self._drop_subtree(child)
        self._drop(node)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
