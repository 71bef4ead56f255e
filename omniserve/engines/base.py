"""The one interface every engine adapter implements, and the data that crosses it.

An engine receives a prompt already rendered by the template layer (token ids plus processed
media), so every engine sees the exact same prompt; it never applies a chat template itself.
It yields per-choice deltas as they are produced and stops work when the consumer goes away.
The gateway knows engines only through this module.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniserve.sampling import SamplingParams
    from omniserve.templates.render import RenderedPrompt


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    max_model_len: int
    modalities: frozenset[str]  # subset of {"text", "image", "video", "audio"}
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class ChoiceDelta:
    """New output of one choice since the last delta. ``finish_reason`` set on the choice's last delta."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class GenerationRequest:
    request_id: str
    prompt: RenderedPrompt
    sampling: SamplingParams


@dataclass
class EngineStats:
    waiting: int  # requests queued for a batch slot
    running: int  # requests being generated
    decode_steps: int = 0  # forward passes over the running batch since start
    decoded_tokens: int = 0  # tokens those passes produced (tokens / steps = mean batch size)


class Engine(abc.ABC):
    """A thin adapter over one inference backend; unaware of HTTP."""

    @property
    @abc.abstractmethod
    def model_info(self) -> ModelInfo: ...

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and get ready to generate; raise ``ModelLoadError`` with a clear message if it cannot."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """True only while the engine can generate right now."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[ChoiceDelta]:
        """Yield deltas until every choice finished.

        Raises ``QueueFull`` (or ``EngineUnavailable``) when called, before any iteration, so a
        streaming response can still answer 429. Closing the
        iterator early (client gone) aborts the request and frees its slot.
        """
