"""The server's speech component: one synthesis at a time, off the event loop, bounded and with a deadline.

A synthesis is CPU- or GPU-heavy work in torch that holds the model (``generate`` keeps per-call state on
it), so it runs in one thread of its own, one at a time per process: concurrent requests wait their
turn, at most ``--speech-max-waiting`` of them (beyond that a 429, as the engine's queue answers). Each
request's whole synthesis, its wait included, must end within ``--speech-timeout``; a request whose
client left, or whose time ran out, stops the thinker and talker at their next step (the codec, which
is not autoregressive, finishes its one pass). Batching several requests through the talker is later
work (issue 17).

It loads the checkpoint itself and never asks which engine serves text, so any engine can sit beside
it; the price is memory: a second copy of the checkpoint's weights (thinker included, since the talker
is conditioned on the thinker's hidden states of the text it speaks).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omniserve.errors import EngineUnavailable, InvalidRequest, QueueFull
from omniserve.speech.base import Speech, SpeechModel
from omniserve.speech.chat_audio import SpokenReplies
from omniserve.speech.detect import speech_family

log = logging.getLogger(__name__)


class SpeechTimeout(EngineUnavailable):
    """A synthesis (its wait included) that outran ``--speech-timeout``."""

    status_code = 504
    default_code = "speech_timeout"


class SpeechSynthesizer:
    def __init__(
        self,
        model: SpeechModel,
        *,
        max_waiting: int,
        timeout_seconds: float,
        max_seconds: float,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.max_waiting = max_waiting
        self.timeout_seconds = timeout_seconds
        self.max_seconds = max_seconds
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="omniserve-speech", initializer=_set_threads, initargs=(threads,)
        )
        self._turn = asyncio.Semaphore(1)
        self._waiting = 0
        self.replies = SpokenReplies()  # chat replies spoken by this server, by audio id (for later histories)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        dtype: str,
        device: str,
        max_waiting: int,
        timeout_seconds: float,
        max_seconds: float,
        threads: int | None = None,
    ) -> SpeechSynthesizer | None:
        """The component for ``model_dir``, or None when it has no talker. Blocks: call it in a thread."""
        family = speech_family(model_dir)
        if family is None:
            return None
        started = time.perf_counter()
        model = importlib.import_module(family).load(model_dir, dtype=dtype, device=device)
        log.info(
            "speech: %s loaded in %.1f s (voices: %s)",
            family.rsplit(".", 1)[-1],
            time.perf_counter() - started,
            ", ".join(model.voices),
        )
        return cls(
            model, max_waiting=max_waiting, timeout_seconds=timeout_seconds, max_seconds=max_seconds, threads=threads
        )

    @property
    def voices(self) -> tuple[str, ...]:
        return self.model.voices

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def busy(self) -> bool:
        """A synthesis is running (or about to): a new request would wait its turn."""
        return self._turn.locked()

    def check_voice(self, voice: str, *, param: str = "voice") -> None:
        if voice not in self.voices:
            raise InvalidRequest(
                f"unknown voice {voice!r}; this model's voices are: {', '.join(self.voices)}", param=param
            )

    async def synthesize(self, text: str, *, voice: str, instructions: str | None) -> Speech:
        """Speak ``text``; cancelling the awaiting task (a client that left) stops the work at its next step."""
        self.check_voice(voice)
        deadline = time.monotonic() + self.timeout_seconds
        stopped = threading.Event()
        if self._turn.locked() and self._waiting >= self.max_waiting:
            raise QueueFull(
                f"speech synthesis is busy: {self._waiting} requests already wait (--speech-max-waiting "
                f"{self.max_waiting}); retry later"
            )
        self._waiting += 1
        try:
            try:
                await asyncio.wait_for(self._turn.acquire(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise self._timeout() from None
        finally:
            self._waiting -= 1
        try:

            def stop() -> bool:
                return stopped.is_set() or time.monotonic() > deadline

            work = asyncio.get_running_loop().run_in_executor(
                self._pool,
                lambda: self.model.synthesize(
                    text, voice=voice, instructions=instructions, max_seconds=self.max_seconds, stop=stop
                ),
            )
            try:
                speech = await asyncio.shield(work)
            except asyncio.CancelledError:
                stopped.set()
                await asyncio.wait({work})  # the turn is given back only once the model is free again
                raise
            if time.monotonic() > deadline:
                raise self._timeout()
            return speech
        finally:
            self._turn.release()

    def _timeout(self) -> SpeechTimeout:
        return SpeechTimeout(f"speech synthesis took longer than --speech-timeout {self.timeout_seconds:g} s")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _set_threads(threads: int | None) -> None:
    """The worker's torch compute threads: the engine's ``--threads`` when given (OpenMP settings are per thread)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
