"""Delta streams: the bounded admission every engine shares, and merging several streams into one.

Here rather than in ``base.py`` or ``server/`` because both sides need them: the ``Engine`` base
class admits every request through ``Admission`` and ``AdmittedStream``; LMDeploy fans one request
out into a stream per choice and the gateway fans a batch of prompts out into a stream per prompt,
and both merge them with the same ``merge_streams``. The server may import engines, never the
other way round, so the one copy lives on the engine side.

- ``Admission``: the bounded queue, in sequences (choices). The ``Engine`` contract is a 429 raised
  synchronously by ``generate`` once ``max_concurrency`` running plus ``max_queue`` waiting
  sequences are taken; every engine counts the same way, so ``--max-queue`` and the queue metrics
  mean one thing whichever engine serves.
- ``AdmittedStream``: gives an admission back exactly once, whether the stream ends, fails or is
  closed, even closed before its first iteration (an async generator closed unstarted never runs
  its ``finally``, which would leak queue places).
- ``merge_streams``: several streams interleaved as their deltas arrive; closing the merge closes
  every stream in it, so each engine request is aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from omniserve.errors import QueueFull

if TYPE_CHECKING:
    from omniserve.engines.base import ChoiceDelta


#: Closes started by ``AdmittedStream.abandon``, kept until they finish.
_CLOSING: set[asyncio.Task[None]] = set()


class Admission:
    """Counts sequences admitted to an engine: ``waiting`` until their first token, then ``running``.

    A sequence stops counting as running when its choice finishes, so ``running`` is what an
    engine is generating now (``EngineStats.running``) and ``waiting`` what waits for a batch slot
    (``EngineStats.waiting``), in sequences for every engine.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.capacity = max_concurrency + max_queue
        self.max_concurrency = max_concurrency
        self.waiting = 0
        self.running = 0
        self.progress_at = time.monotonic()  # the last delta from the engine, or when work arrived at an idle one

    def reserve(self, sequences: int) -> None:
        """Take places for ``sequences`` or raise ``QueueFull`` (before any work starts)."""
        if self.waiting + self.running + sequences > self.capacity:
            raise QueueFull(
                f"the server is at capacity ({self.running} sequences running, {self.waiting} waiting); retry later"
            )
        if self.waiting + self.running == 0:
            self.progress_at = time.monotonic()  # an idle engine has not been stalling: the clock starts now
        self.waiting += sequences

    def progressed(self) -> None:
        self.progress_at = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds without a delta from the engine while sequences are admitted (0.0 when idle)."""
        if self.waiting + self.running == 0:
            return 0.0
        return max(0.0, time.monotonic() - self.progress_at)

    def started(self, sequences: int) -> None:
        moved = min(sequences, self.waiting)
        self.waiting -= moved
        self.running += moved

    def release(self, waiting: int, running: int) -> None:
        self.waiting -= waiting
        self.running -= running


class AdmittedStream:
    """An engine's delta stream that returns its admission places exactly once.

    ``source`` yields the deltas; the first delta of each choice moves that choice from waiting to
    running, its last delta (the one with a finish reason) gives its running place back. Closing
    this stream closes ``source`` (which aborts the request in the engine).
    """

    def __init__(self, source: AsyncIterator[ChoiceDelta], admission: Admission, sequences: int) -> None:
        self._source = source
        self._admission = admission
        self.sequences = sequences  # the places this stream holds until it ends
        self._waiting = sequences
        self._started: set[int] = set()
        self._running: set[int] = set()
        self._released = False

    def __aiter__(self) -> AdmittedStream:
        return self

    async def __anext__(self) -> ChoiceDelta:
        try:
            delta = await self._source.__anext__()
        except BaseException:  # StopAsyncIteration included: the request is over either way
            self._release()
            raise
        self._admission.progressed()
        if delta.index not in self._started and self._waiting:
            self._started.add(delta.index)
            self._running.add(delta.index)
            self._waiting -= 1
            self._admission.started(1)
        if delta.finish_reason is not None and delta.index in self._running:
            self._running.discard(delta.index)
            self._admission.release(0, 1)
        return delta

    async def aclose(self) -> None:
        try:
            await close_stream(self._source)
        finally:
            self._release()

    def abandon(self) -> None:
        """Give the places back now and close the source soon, for a caller that cannot await.

        ``Engine.generate_all`` uses it when a later request of the same batch cannot be handed to
        the engine: this stream was never iterated, so closing it only withdraws queued work.
        """
        self._release()
        task = asyncio.get_running_loop().create_task(close_stream(self._source))
        _CLOSING.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_CLOSING.discard)

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.release(self._waiting, len(self._running))


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close ``stream`` if it can be closed (async generators and ``AdmittedStream`` can)."""
    aclose: Callable[[], Any] | None = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def merge_streams(streams: list[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Interleave several delta streams as their deltas arrive, tagged with the stream's index.

    Closing the merged stream (or a failure in one stream) ends every stream in it before this
    returns: the per-stream tasks are cancelled and awaited, so no stream is left running in the
    engine, and a caller that closes the streams afterwards never meets one that is still running.
    """
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield 0, delta
        finally:
            await close_stream(streams[0])
        return
    queue: asyncio.Queue[tuple[int, ChoiceDelta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
            await queue.put((i, None))
        except BaseException as exc:
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:  # a stream whose task was cancelled before it started was never closed
            await close_stream(stream)
