"""The adapters a server serves: names, which are resident in the engine, and who is using them.

Every adapter registered (``--lora``, ``--lora-file``, ``POST /v1/load_lora_adapter``) can be asked
for by name; at most ``--max-loras`` are resident in the engine at once. A request *leases* its
adapter (``acquire``) before its stream starts and gives it back when the stream ends
(``LoraLease.release``). An adapter that is not resident is loaded on demand; when every slot is
taken, the least recently used adapter no request holds is unloaded first, and when every resident
adapter is held, the request waits until one is given back.

Unloading (``remove``) an adapter that requests hold, or wait for, is **refused** with a 409 rather
than waited for: the operator retries once the adapter is idle, and no request ever fails because
its adapter went away under it.

Everything runs on the server's event loop; the engine's load/unload hooks do their blocking work
in threads, so a load never blocks requests already running. One lock serialises residency changes;
an adapter already resident is leased without waiting for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omniserve.errors import InvalidRequest, ModelLoadError, ModelNotFound, OmniServeError
from omniserve.lora.adapter import LoraAdapter, LoraBase, read_adapter

if TYPE_CHECKING:
    from omniserve.engines.base import ChoiceDelta, Engine

log = logging.getLogger(__name__)

#: Longest adapter name accepted (it becomes a metric label and a ``/v1/models`` id).
MAX_NAME_LENGTH = 256


class LoraInUse(OmniServeError):
    """An unload asked for an adapter that requests are using: refused, not waited for."""

    status_code = 409
    default_code = "lora_in_use"


@dataclass
class _Entry:
    adapter: LoraAdapter
    resident: bool = False
    users: int = 0  # leases held: requests whose streams have not ended
    waiting: int = 0  # requests waiting for the adapter to become resident
    last_used: int = 0  # the registry's clock at the last lease or release (LRU order)


class LoraLease:
    """One request's hold on its adapter; ``release`` (idempotent) when its stream ends."""

    def __init__(self, registry: LoraRegistry, entry: _Entry) -> None:
        self._registry, self._entry = registry, entry
        self.adapter = entry.adapter

    def release(self) -> None:
        if self._entry is not None:
            self._registry._release(self._entry)
            self._entry = None


class LoraRegistry:
    """Served adapters by name, with LRU residency in ``engine`` and per-adapter use counts."""

    def __init__(self, engine: Engine, base: LoraBase, *, base_name: str, max_loras: int) -> None:
        self._engine = engine
        self._base = base
        self._base_name = base_name
        self.max_loras = max_loras
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count(1)  # never reused: vLLM caches adapters by id
        self._clock = itertools.count(1)
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.updated = time.time()  # last change of residency or use, for omniserve_lora_requests_info

    # ---------------------------------------------------------------- what is served

    @property
    def adapters(self) -> list[LoraAdapter]:
        return [entry.adapter for entry in self._entries.values()]

    def resolve(self, name: str) -> LoraAdapter | None:
        """The adapter a request's ``model`` names; None for the base; ``ModelNotFound`` (404) otherwise."""
        if name == self._base_name:
            return None
        entry = self._entries.get(name)
        if entry is None:
            served = ", ".join([repr(self._base_name), *map(repr, self._entries)])
            raise ModelNotFound(f"The model '{name}' does not exist; this server serves {served}", param="model")
        return entry.adapter

    def running(self) -> list[str]:
        return [name for name, entry in self._entries.items() if entry.users]

    def waiting(self) -> list[str]:
        return [name for name, entry in self._entries.items() if entry.waiting]

    def resident(self) -> list[str]:
        return [name for name, entry in self._entries.items() if entry.resident]

    # ---------------------------------------------------------------- registering

    async def start(self, adapters: Mapping[str, Path]) -> None:
        """Register the adapters given at start-up and load the first ``max_loras``; ``ModelLoadError`` if one fails."""
        for name, path in adapters.items():
            try:
                await self.add(name, path)
            except OmniServeError as exc:
                raise ModelLoadError(f"--lora {name}={path}: {exc.message}") from None

    async def add(self, name: str, path: Path) -> LoraAdapter:
        """Register (and, with a free slot, load) the adapter in ``path``; ``InvalidRequest`` if it cannot serve."""
        self._check_name(name)
        adapter = await asyncio.to_thread(read_adapter, name, Path(path), next(self._ids), self._base)
        self._engine.check_adapter(adapter)
        async with self._lock:
            self._check_name(name)  # another load of the same name may have finished meanwhile
            entry = _Entry(adapter, last_used=next(self._clock))
            if sum(e.resident for e in self._entries.values()) < self.max_loras:
                await self._engine.load_adapter(adapter)  # a bad file is refused now, not on first use
                entry.resident = True
            self._entries[name] = entry
            self._touch()
        log.info("LoRA adapter %s served from %s (rank %d)", name, path, adapter.rank)
        return adapter

    async def remove(self, name: str) -> None:
        """Stop serving ``name``; refused (409) while requests hold or wait for it."""
        async with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(
                    f"no LoRA adapter named '{name}' is loaded", param="lora_name", code="lora_not_found"
                )
            if entry.users or entry.waiting:
                raise LoraInUse(
                    f"LoRA adapter '{name}' is in use by {entry.users + entry.waiting} request(s); unloading refuses "
                    "rather than waits: retry once they finish",
                    param="lora_name",
                )
            del self._entries[name]
            if entry.resident:
                await self._engine.unload_adapter(name)
            self._touch()
        log.info("LoRA adapter %s unloaded", name)

    def _check_name(self, name: str) -> None:
        if not name or len(name) > MAX_NAME_LENGTH or name != name.strip():
            raise InvalidRequest(
                f"a LoRA adapter name must be 1-{MAX_NAME_LENGTH} characters without surrounding spaces",
                param="lora_name",
            )
        if name == self._base_name:
            raise InvalidRequest(f"'{name}' is the base model's name; choose another adapter name", param="lora_name")
        if name in self._entries:
            raise InvalidRequest(
                f"a LoRA adapter named '{name}' is already loaded; unload it first",
                param="lora_name",
                code="lora_already_loaded",
            )

    # ---------------------------------------------------------------- leasing

    async def acquire(self, name: str) -> LoraLease:
        """Hold ``name`` for one request, loading it (evicting the least recently used idle one) if needed."""
        entry = self._entries.get(name)
        if entry is None:
            self.resolve(name)  # raises the 404
        assert entry is not None
        if entry.resident:  # no await before the count: the event loop cannot evict it meanwhile
            return self._lease(entry)
        entry.waiting += 1
        self._touch()
        try:
            while True:
                async with self._lock:
                    if self._entries.get(name) is not entry:
                        raise ModelNotFound(f"LoRA adapter '{name}' was unloaded", param="model")
                    if entry.resident or await self._make_resident(entry):
                        return self._lease(entry)
                    changed = self._changed
                await changed.wait()  # every resident adapter is held: until one is given back
        finally:
            entry.waiting -= 1
            self._touch()

    async def _make_resident(self, entry: _Entry) -> bool:
        """Load ``entry`` into a free slot, or one freed from the LRU idle adapter; False when all are held."""
        resident = [e for e in self._entries.values() if e.resident]
        if len(resident) >= self.max_loras:
            idle = [e for e in resident if not e.users]
            if not idle:
                return False
            victim = min(idle, key=lambda e: e.last_used)
            victim.resident = False
            await self._engine.unload_adapter(victim.adapter.name)
            log.info("LoRA adapter %s unloaded to make room for %s", victim.adapter.name, entry.adapter.name)
        await self._engine.load_adapter(entry.adapter)
        entry.resident = True
        return True

    def _lease(self, entry: _Entry) -> LoraLease:
        entry.users += 1
        entry.last_used = next(self._clock)
        self._touch()
        return LoraLease(self, entry)

    def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        entry.last_used = next(self._clock)
        self._touch()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _touch(self) -> None:
        self.updated = time.time()


def leased(streams: Sequence[AsyncIterator[ChoiceDelta]], choices: Sequence[int], lease: LoraLease) -> list[_Leased]:
    """``streams`` (one request's jobs, ``choices[i]`` choices each) that give ``lease`` back once all have ended.

    A stream ends when it is exhausted, fails, is closed, or has delivered the last delta of each of
    its choices (a caller may stop reading there), the way the engine's admission counts it.
    """
    remaining = [len(streams)]

    def ended() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            lease.release()

    return [_Leased(stream, n, ended) for stream, n in zip(streams, choices, strict=True)]


class _Leased:
    def __init__(self, source: AsyncIterator[ChoiceDelta], choices: int, ended: Callable[[], None]) -> None:
        self._source, self._open, self._ended = source, choices, ended
        self._done = False

    def __aiter__(self) -> _Leased:
        return self

    async def __anext__(self) -> ChoiceDelta:
        try:
            delta = await self._source.__anext__()
        except BaseException:
            self._end()
            raise
        if delta.finish_reason is not None:
            self._open -= 1
            if self._open <= 0:
                self._end()
        return delta

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._ended()
