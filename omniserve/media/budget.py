"""How much decoding one request, and the whole process, may do: checked before the work, not after.

A request of 1,520 tiny audio clips once made the server allocate 23 GB and die: nothing bounded the
number of parts, the work they decode to, or how much of it all requests hold together. Four bounds,
from the cheapest to check:

1. Counts (:func:`check_counts`): parts of each kind per request, before anything is fetched.
2. The request's budget (:class:`RequestBudget`): pixels (images and video frames) and audio seconds.
   Planned from the headers before any decoding (:class:`MediaPlan`), then charged by the decoders as
   they decode, because headers can be missing or lie.
3. The process (:class:`MediaGate`, one per app, shared by its requests): decodes running at once and
   decoded bytes held at once. A request waits for both, first come first served, up to a bound, then
   gets :class:`~omniserve.errors.MediaBusy` (503 with Retry-After) instead of an out-of-memory kill.
4. Each item's deadline and cancellation (:class:`DecodeControl`), checked by the decoders between
   packets and frames, so a slow file stops at its deadline and a request whose client left stops
   decoding instead of running to the end in a thread nobody waits for.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Protocol, TypeVar

from omniserve.config import MediaLimits
from omniserve.errors import MediaBudgetExceeded, MediaBusy, MediaDecodeTimeout, MediaError, TooManyMediaItems
from omniserve.media._pyav import DECODE_SLACK_SECONDS, declared_over

T = TypeVar("T")

_RGB_BYTES = 3  # decoded pixels are held as RGB uint8
_SAMPLE_BYTES = 4  # decoded audio is held as float32


class MediaPart(Protocol):
    """What the count check needs of a media reference (``loader.MediaSource`` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def param(self) -> str: ...


def check_counts(parts: Sequence[MediaPart], limits: MediaLimits) -> None:
    """Refuse a request with more parts of a kind than ``--limit-media-per-request`` allows; fetches nothing."""
    totals = Counter(part.kind for part in parts)
    seen: Counter[str] = Counter()
    for part in parts:
        seen[part.kind] += 1
        limit = limits.media_per_request(part.kind)
        if seen[part.kind] > limit:
            total = totals[part.kind]
            accepts = f"at most {limit} per request" if limit else f"no {part.kind} input"
            raise TooManyMediaItems(
                f"This request has {total} {part.kind} part{'s' if total != 1 else ''}; this server accepts "
                f"{accepts} (--limit-media-per-request {part.kind}={limit}).",
                param=part.param,
            )


@dataclass(frozen=True)
class MediaPlan:
    """What one item will decode to, known from its header alone."""

    pixels: int = 0  # images: width x height; videos: sampled frames x width x height
    audio_seconds: float = 0.0  # the declared length; 0 when the header does not say
    audio_bound_seconds: float = 0.0  # the most it can decode to (the per-clip cap), whatever it declares


class RequestBudget:
    """One request's decoded work, charged by its decoders (in worker threads, hence the lock)."""

    def __init__(self, limits: MediaLimits) -> None:
        self._limits = limits
        self._rate = limits.audio_sample_rate
        self._lock = threading.Lock()
        self._pixels = 0
        self._samples = 0
        # What was reserved for the request (see plan()); until then, the budget itself.
        self._pixel_cap = limits.max_pixels_per_request
        self._sample_cap = self._budget_samples()

    def _budget_samples(self) -> int:
        return math.ceil((self._limits.max_audio_seconds_per_request + DECODE_SLACK_SECONDS) * self._rate)

    def plan(self, plans: Sequence[MediaPlan], params: Sequence[str]) -> int:
        """Refuse a request whose headers already exceed a budget; return the decoded bytes to reserve.

        Pixels are reserved as planned (headers are exact for honest files; decoding more is refused).
        Audio is reserved at its bound, not its declared length, since declared lengths are estimates;
        the budget caps that bound too, because the decoders stop when the request's total passes it.
        """
        pixels = 0
        declared = 0.0
        for plan, param in zip(plans, params, strict=True):
            pixels += plan.pixels
            if pixels > self._limits.max_pixels_per_request:
                raise self._over_pixels(pixels, param)
            declared += plan.audio_seconds
            if declared_over(declared, self._limits.max_audio_seconds_per_request):  # tolerates estimates
                raise self._over_audio(declared, param)
        bound = sum(plan.audio_bound_seconds for plan in plans)
        with self._lock:
            self._pixel_cap = pixels
            self._sample_cap = min(math.ceil(bound * self._rate), self._budget_samples())
            return self._pixel_cap * _RGB_BYTES + self._sample_cap * _SAMPLE_BYTES

    def charge_pixels(self, pixels: int, param: str | None) -> None:
        with self._lock:
            self._pixels += pixels
            total = self._pixels
        if total > self._limits.max_pixels_per_request:
            raise self._over_pixels(total, param)
        if total > self._pixel_cap:
            raise MediaError(
                f"The request's media decode to more pixels ({total}) than their headers declared ({self._pixel_cap}).",
                param=param,
            )

    def charge_audio_samples(self, samples: int, param: str | None) -> None:
        with self._lock:
            self._samples += samples
            total = self._samples
        if total > min(self._sample_cap, self._budget_samples()):
            raise self._over_audio(total / self._rate, param)

    def _over_pixels(self, pixels: int, param: str | None) -> MediaBudgetExceeded:
        return MediaBudgetExceeded(
            f"The request's images and video frames decode to {pixels} pixels, over this server's "
            f"per-request budget of {self._limits.max_pixels_per_request} pixels (--max-pixels-per-request).",
            param=param,
        )

    def _over_audio(self, seconds: float, param: str | None) -> MediaBudgetExceeded:
        return MediaBudgetExceeded(
            f"The request's audio is {seconds:.1f} s long in all, over this server's per-request budget of "
            f"{self._limits.max_audio_seconds_per_request:g} s (--max-audio-seconds-per-request).",
            param=param,
        )


class DecodeControl:
    """One item's deadline, cancellation and request budget, for its decoder to check as it goes.

    The deadline counts only the time the item's work runs (reading its header, decoding it), not the
    time it waits for a decode slot: a busy server answers 503, it does not fail items for slowness.
    """

    def __init__(
        self, limits: MediaLimits, *, param: str | None = None, kind: str = "media", budget: RequestBudget | None = None
    ) -> None:
        self.timeout = limits.media_decode_timeout_seconds
        self.param = param
        self.kind = kind
        self.budget = budget
        self._spent = 0.0
        self._started: float | None = None
        self._cancelled = threading.Event()

    @contextmanager
    def running(self) -> Iterator[None]:
        """One step of the item's work; the deadline covers all its steps together."""
        self._started = time.monotonic()
        try:
            yield
        finally:
            self._spent += time.monotonic() - self._started
            self._started = None

    def remaining(self) -> float:
        running = time.monotonic() - self._started if self._started is not None else 0.0
        return self.timeout - self._spent - running

    def check(self) -> None:
        """Raise if the request went away or the item is past its deadline; decoders call it per packet."""
        if self._cancelled.is_set():
            raise MediaError("Decoding was cancelled: the request went away.", param=self.param)
        if self.remaining() < 0:
            raise self.timeout_error()

    def expired(self) -> bool:
        return self._cancelled.is_set() or self.remaining() < 0

    def timeout_error(self) -> MediaDecodeTimeout:
        return MediaDecodeTimeout(
            f"Decoding this {self.kind} took longer than this server's limit of {self.timeout:g} s per media "
            "item (--media-decode-timeout).",
            param=self.param,
        )

    def cancel(self) -> None:
        """Called from the event loop when the request is cancelled; the decoder stops at its next check."""
        self._cancelled.set()

    def charge_pixels(self, pixels: int) -> None:
        if self.budget is not None:
            self.budget.charge_pixels(pixels, self.param)

    def charge_audio_samples(self, samples: int) -> None:
        if self.budget is not None:
            self.budget.charge_audio_samples(samples, self.param)


class _FifoPool:
    """Units of one resource handed out first come, first served; a waiter gives up after a bound.

    First come, first served so a large request is not starved by a stream of small ones. Used from
    the event loop only (not thread-safe, no lock needed).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int, timeout: float, busy: Callable[[], MediaBusy]) -> None:
        if not self._waiters and self.used + amount <= self.capacity:
            self.used += amount
            return
        waiter = (amount, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter[1]
        except BaseException as exc:
            granted = waiter[1].done() and not waiter[1].cancelled()
            if granted and isinstance(exc, TimeoutError):
                return  # granted just as the wait ran out: keep it
            if granted:
                self.release(amount)
            else:
                with suppress(ValueError):
                    self._waiters.remove(waiter)
                self._grant()  # a smaller waiter behind this one may fit now
            if isinstance(exc, TimeoutError):
                raise busy() from None
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.done():  # its waiter gave up
                self._waiters.popleft()
                continue
            if self.used + amount > self.capacity:
                return
            self._waiters.popleft()
            self.used += amount
            future.set_result(None)


class MediaGate:
    """The process's decoding capacity: created once by the app from its limits and shared by its requests.

    Decoding runs in worker threads that hold decoded media in memory; without a bound, concurrent
    requests multiply both until the kernel kills the process. Waits are bounded by
    ``media_wait_timeout_seconds``; past it the request gets a 503 with Retry-After.

    The bytes counted are the decoded media (RGB pixels, float32 samples) from the moment they are
    planned until the request's block in ``loader.loaded_media`` ends; the decoders' transient buffers
    and the processor's copies made while rendering come on top, so leave room for them in the memory
    given to the process.
    """

    def __init__(self, limits: MediaLimits) -> None:
        self.max_concurrent_decodes = limits.max_concurrent_decodes
        self.max_decoded_bytes = limits.max_decoded_media_bytes
        self.wait_seconds = limits.media_wait_timeout_seconds
        self._slots = _FifoPool(self.max_concurrent_decodes)
        self._bytes = _FifoPool(self.max_decoded_bytes)

    @property
    def decodes_running(self) -> int:
        return self._slots.used

    @property
    def decoded_bytes_held(self) -> int:
        return self._bytes.used

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of decoded media for the block: wait (bounded) until they fit with everyone else's."""
        # A request within its budgets fits alone (MediaLimits checks it); the clamp covers codec slack.
        amount = min(nbytes, self.max_decoded_bytes)

        def busy() -> MediaBusy:
            return MediaBusy(
                f"This request's media need {nbytes} bytes of memory once decoded, and decoded media of other "
                f"requests kept this server's {self.max_decoded_bytes} bytes (--max-decoded-media-bytes) too "
                f"full for {self.wait_seconds:g} s (--media-wait-timeout); try again later."
            )

        await self._bytes.acquire(amount, self.wait_seconds, busy)
        try:
            yield
        finally:
            self._bytes.release(amount)

    async def run(self, work: Callable[[], T], control: DecodeControl) -> T:
        """``work`` in a worker thread once a decode slot is free; cancelling the caller stops the work."""

        def busy() -> MediaBusy:
            return MediaBusy(
                f"All {self.max_concurrent_decodes} decode slots (--max-concurrent-decodes) stayed busy for "
                f"{self.wait_seconds:g} s (--media-wait-timeout); try again later."
            )

        await self._slots.acquire(1, self.wait_seconds, busy)
        try:
            return await _in_thread(work, control)
        finally:
            self._slots.release(1)


async def _in_thread(work: Callable[[], T], control: DecodeControl) -> T:
    """Run ``work`` in a thread; if the caller is cancelled, tell the work to stop and wait until it has.

    Returning at once would free the decode slot while the thread still decodes: the bound would then
    count threads nobody waits for. The work stops at its next ``control.check()``.
    """
    task = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        control.cancel()
        while not task.done():
            with suppress(asyncio.CancelledError):  # cancelled again: still wait; re-raised below
                await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: nobody wants the result of a cancelled request
        raise
