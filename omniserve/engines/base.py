"""The one engine interface the gateway knows, and the template method every engine fills in.

An engine receives a prompt already rendered by the template layer (token ids plus processed
media), so every engine sees the exact same prompt; it never applies a chat template itself.
It yields per-choice deltas as they are produced and stops work when the consumer goes away.
The gateway knows engines only through this module.

``Engine`` owns the flow, as ``server/serving_base.py`` does for endpoints: ``start``/``stop``,
readiness, stats, and ``generate`` (refuse what cannot run, with a 503, a 400 or a 429 before any
iteration; admit the request's sequences into the shared bounded queue; give them back however the
stream ends), and ``generate_all``, the same for a batch of prompts, admitted all at once or not at
all. Adding an engine is one file with one subclass filling in four hooks:

- ``launch``: create the native engine (load, warm up) and say what it serves (``ModelInfo``);
- ``shutdown``: stop it (blocking; ``stop`` runs it in a thread);
- ``prepare``: map a request's sampling parameters (and media) to the engine's own, synchronously,
  so an unsupported or invalid value is a 400 before the stream starts;
- ``stream``: the engine's native outputs as ``ChoiceDelta`` objects; closing it aborts the request.

Optionally ``alive`` (whether the native engine still runs), ``stalled_for`` (how long it has had
work without finishing a step; ``/health`` turns red past ``--stall-timeout``) and ``UNSUPPORTED``
(sampling fields the engine cannot honour: a non-default value is refused with a 400 naming the
engine). What every engine converts the same way is here once: ``finish_reason`` and
``TokenLogprobs.decoded``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from omniserve.engines.streams import Admission, AdmittedStream
from omniserve.errors import EngineUnavailable, InvalidRequest, UnsupportedParameter
from omniserve.sampling import SamplingParams

if TYPE_CHECKING:
    from omniserve.config import EngineConfig
    from omniserve.lora.adapter import LoraAdapter
    from omniserve.templates.render import RenderedPrompt

#: What ``prepare`` makes of a request for ``stream``: the engine's own sampling parameters and media.
NativeT = TypeVar("NativeT")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()

    @classmethod
    def decoded(cls, tokenizer: Any, token_id: int, logprob: float, top: Iterable[tuple[int, float]]) -> TokenLogprobs:
        """One generated token's logprob and its ``top`` alternatives (``(token id, logprob)``, best first).

        Every engine decodes the tokens with the served model's tokenizer, one token at a time, so
        the strings are the same whichever engine produced the numbers.
        """
        decode = tokenizer.decode
        return cls(token_id, decode([token_id]), logprob, tuple((tid, decode([tid]), lp) for tid, lp in top))


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
    adapter: LoraAdapter | None = None  # the LoRA adapter the request names as its model; None: the base


@dataclass
class EngineStats:
    """What ``/metrics`` reports, counted the same way by every engine."""

    waiting: int  # sequences (choices) admitted and waiting for their first token
    running: int  # sequences being generated (first token produced, not finished)
    decode_steps: int = 0  # forward passes over the running batch since start (engines that step themselves)
    decoded_tokens: int = 0  # tokens those passes produced (tokens / steps = mean batch size)
    kv_cache_usage: float | None = None  # fraction of KV-cache capacity in use; None: the engine cannot tell
    # prompt tokens looked up in the prefix cache, and those found there (reused); None: no prefix cache
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None


class Engine(abc.ABC, Generic[NativeT]):
    """A thin adapter over one inference backend, unaware of HTTP; subclasses fill in the hooks.

    ``NAME`` is the engine as ``--engine`` spells it (error messages name it).
    """

    NAME: ClassVar[str]
    #: ``SamplingParams`` fields this engine cannot honour: a request setting one is a 400.
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._info: ModelInfo | None = None
        self._stopping = False
        self._admission = Admission(config.max_concurrency, config.max_queue)
        # engines that run their own decode loop count its steps here, for ``stats``
        self._decode_steps = 0
        self._decoded_tokens = 0

    # ---------------------------------------------------------------- hooks

    @abc.abstractmethod
    async def launch(self) -> ModelInfo:
        """Create the native engine and make it ready to generate; return what it serves (``served``).

        Raise ``ModelLoadError`` with a clear message (engine, model, cause, fix) if it cannot.
        """

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the native engine if one was created (blocking: ``stop`` runs it in a thread)."""

    @abc.abstractmethod
    def prepare(self, request: GenerationRequest) -> NativeT:
        """The request in the engine's own terms; raise ``InvalidRequest`` for what it cannot run.

        Called by ``generate`` before the stream exists, so a refusal is a 400, not an error event.
        """

    @abc.abstractmethod
    def stream(self, request: GenerationRequest, native: NativeT) -> AsyncIterator[ChoiceDelta]:
        """Yield the deltas of every choice until all finished.

        Closing it early (client gone) must abort the request in the engine, even when it is closed
        before its first iteration. An async generator does both by itself: it starts no work until
        iterated, and its ``finally`` runs when closed. An iterator that starts work when created
        (the transformers engine queues the request at once) must withdraw it in ``aclose``.
        """

    def alive(self) -> bool:
        """Whether the native engine still runs; override where the engine can tell."""
        return True

    def stalled_for(self) -> float:
        """Seconds the engine has had work pending without making progress (0.0 when idle).

        A live thread is not a working engine: a wedged kernel or a deadlock leaves ``alive`` true while
        every request waits. The default measures what every engine shows the gateway: time since its
        last delta while sequences are admitted. An engine that sees its own steps can say more
        precisely (the transformers engine counts a finished prefill or decode step as progress).
        """
        return self._admission.stalled_for()

    def kv_cache_usage(self) -> float | None:
        """Fraction (0-1) of the engine's KV-cache capacity in use, or None where the engine cannot tell.

        Inference-gateway endpoint pickers route on it (as they read vLLM's ``kv_cache_usage_perc``).
        """
        return None

    # ---------------------------------------------------------------- LoRA hooks (omniserve/lora)

    def check_adapter(self, adapter: LoraAdapter) -> None:
        """Raise ``InvalidRequest`` for an adapter this engine cannot apply (before it is registered)."""
        raise InvalidRequest(f"the {self.NAME} engine does not serve LoRA adapters", param="model")

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        """Make ``adapter`` resident; the registry calls it at most ``--max-loras`` adapters at a time."""

    async def unload_adapter(self, name: str) -> None:
        """Free a resident adapter; the registry calls it only when no request uses the adapter."""

    # ---------------------------------------------------------------- template methods

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineUnavailable("the engine has not started")
        return self._info

    async def start(self) -> None:
        """Load the model and get ready to generate; raise ``ModelLoadError`` with a clear message if it cannot."""
        self._info = await self.launch()

    async def stop(self) -> None:
        self._stopping = True
        # a thread of its own, not the loop's default pool: media work stuck there must not delay shutdown
        pool = ThreadPoolExecutor(1, thread_name_prefix="omniserve-engine-stop")
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self.shutdown)
        finally:
            pool.shutdown(wait=False)

    def is_ready(self) -> bool:
        """True only while the engine can generate right now."""
        return self._info is not None and not self._stopping and self.alive()

    def stats(self) -> EngineStats:
        queries, hits = self.prefix_cache_counts() or (None, None)
        return EngineStats(
            waiting=self._admission.waiting,
            running=self._admission.running,
            decode_steps=self._decode_steps,
            decoded_tokens=self._decoded_tokens,
            kv_cache_usage=self.kv_cache_usage(),
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
        )

    def prefix_cache_counts(self) -> tuple[int, int] | None:
        """``(queried, hit)`` prompt tokens of the engine's prefix cache since start; None where it has none."""
        return None

    def generate(self, request: GenerationRequest) -> AsyncIterator[ChoiceDelta]:
        """Yield deltas until every choice finished.

        Everything that can refuse the request happens here, when called, before any iteration,
        so a streaming response can still answer with a status: ``EngineUnavailable`` (503), an
        ``n`` larger than the batch or an unsupported parameter (400), ``QueueFull`` (429). Closing
        the iterator early (client gone) aborts the request and frees its places.
        """
        return self.generate_all([request])[0]

    def generate_all(self, requests: Sequence[GenerationRequest]) -> list[AsyncIterator[ChoiceDelta]]:
        """``generate`` for the requests that make up one client request (a batch of prompts): all or none.

        Every request is checked and the places of all their sequences are reserved at once, before
        any stream exists, so a refused batch leaves nothing queued or running: admitting the
        prompts one by one let the first start (the transformers engine queues a request as its
        stream is made) while a later one was refused, and it then decoded for nobody.
        """
        if not self.is_ready():
            raise EngineUnavailable(f"the {self.NAME} engine is not ready to generate")
        batch, capacity = self._config.max_concurrency, self._admission.capacity
        for request in requests:
            n = request.sampling.n
            if n > batch:  # it could never run: a 429 would be retried forever
                raise InvalidRequest(
                    f"n={n} is more than the {batch} sequences the {self.NAME} engine decodes at once "
                    "(--max-concurrency)",
                    param="n",
                )
            refuse_unsupported(request.sampling, self.UNSUPPORTED, self.NAME)
        total = sum(request.sampling.n for request in requests)
        if total > capacity:  # never admissible either, even on an idle engine
            raise InvalidRequest(
                f"the request needs {total} sequences ({len(requests)} prompts, n={requests[0].sampling.n} each), "
                f"more than the {capacity} the {self.NAME} engine admits at once (--max-concurrency + --max-queue)",
                param="prompt",
            )
        natives = [self.prepare(request) for request in requests]
        self._admission.reserve(total)
        streams: list[AdmittedStream] = []
        try:
            for request, native in zip(requests, natives, strict=True):
                streams.append(AdmittedStream(self.stream(request, native), self._admission, request.sampling.n))
        except BaseException:  # e.g. the engine began shutting down: withdraw what was already handed over
            self._admission.release(total - sum(stream.sequences for stream in streams), 0)
            for stream in streams:
                stream.abandon()
            raise
        return list(streams)

    def served(self, max_model_len: int, eos_token_ids: Iterable[int | None]) -> ModelInfo:
        """The ``ModelInfo`` for ``launch`` to return: the configured name and path, ``eos`` ids deduplicated."""
        cfg = self._config
        return ModelInfo(
            name=cfg.served_model_name,
            path=str(cfg.model),
            max_model_len=max_model_len,
            eos_token_ids=tuple(dict.fromkeys(t for t in eos_token_ids if t is not None)),
        )


_SAMPLING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def refuse_unsupported(params: SamplingParams, names: Iterable[str], engine: str) -> None:
    """Raise ``UnsupportedParameter`` (400) for the first of ``names`` set to other than its default.

    An option an engine cannot honour is refused, never silently ignored.
    """
    for name in names:
        if getattr(params, name) != _SAMPLING_DEFAULTS[name]:
            raise UnsupportedParameter(f"the {engine} engine does not support {name}", param=name)


def finish_reason(native: str | None) -> str | None:
    """An engine's finish reason as omniserve's: ``length`` and ``abort`` kept, any other is a stop.

    None or empty: not finished. Every engine's reasons map the same way, including vLLM's
    "repetition" (its repetition detector stopped the choice), a stop as OpenAI has no such reason.
    """
    if not native:
        return None
    return native if native in ("length", "abort") else "stop"
