"""The transformers engine: continuous batching on a worker thread, streaming into asyncio.

Admission (the bounded queue, counted in sequences), readiness, stats and the 400s/429s are the
``Engine`` base class's, as for every engine; this module fills in its hooks. Admitted requests wait
in the worker's queue; the worker takes them while batch slots are free. Each worker step is at
most one prefill pass and one decode pass: text prompts are prefilled together, in chunks, under
``--max-batch-tokens`` (running sequences count one token each, the rest of the budget goes to the
chunk), so a long prompt delays the running sequences' next token by one chunk, never by its whole
prefill. Prompts with media are prefilled whole, one media pass per step: the first one waiting and
every other whose processor outputs join its batch (``hf_model.media_layout``) under the same LoRA
adapter, while the pass (rows x longest prompt) fits the same budget; a prompt whose media do not
join, or that alone is over the budget, goes alone. The decode pass runs every running sequence on
one preallocated cache (``kv_cache.SlotCache``). Sequences leave the batch as soon as they finish or
their client goes away. Generation never runs on the event loop, so /health and /metrics answer
while the model works.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omniserve.config import EngineConfig
from omniserve.engines.base import ChoiceDelta, Engine, GenerationRequest, ModelInfo, TokenLogprobs
from omniserve.engines.detokenizer import IncrementalDetokenizer
from omniserve.engines.sampler import Sampled, SamplerState, sample_rows
from omniserve.errors import EngineError, EngineUnavailable, ModelLoadError

if TYPE_CHECKING:
    from omniserve.lora.adapter import LoraAdapter

log = logging.getLogger(__name__)

_DONE = object()


class _Outbox:
    """Deltas produced by one worker iteration, handed to the event loop in one wake-up.

    Waking the loop costs a socket write; doing it once per token per sequence took a sixth of
    the worker's time at 16 concurrent requests.
    """

    def __init__(self) -> None:
        self._items: list[tuple[_Pending, Any]] = []

    def put(self, pending: _Pending, item: Any) -> None:
        self._items.append((pending, item))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, Any]]] = {}
        for pending, item in items:
            by_loop.setdefault(pending.loop, []).append((pending, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for pending, _ in batch:
                    pending.cancelled.set()


def _deliver(batch: list[tuple[_Pending, Any]]) -> None:
    for pending, item in batch:
        pending.events.put_nowait(item)


@dataclass
class _Pending:
    """A request as the worker sees it; ``events`` is fed (through the outbox) from the worker thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]
    outbox: _Outbox
    cancelled: threading.Event = field(default_factory=threading.Event)
    open_choices: int = 0
    grammar: Any = None  # the compiled constraint (``prepare``), one matcher per choice
    prefix_key: Any = None  # ``prefix_cache.PrefixKey`` of its prompt (a media prompt's, to store it once prefilled)

    def emit(self, item: Any) -> None:
        self.outbox.put(self, item)


class _Relay:
    """One request's deltas as the worker emits them; closing it, even before the first delta, withdraws
    the request from the worker (a queued one is never prefilled, a running one leaves the batch)."""

    def __init__(self, pending: _Pending, wakeup: threading.Event) -> None:
        self._pending = pending
        self._wakeup = wakeup
        self._over = False

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> ChoiceDelta:
        if self._over:
            raise StopAsyncIteration
        try:
            item = await self._pending.events.get()
        except BaseException:  # the consumer was cancelled while waiting
            self._withdraw()
            raise
        if item is _DONE or isinstance(item, BaseException):
            self._over = True
            if item is _DONE:
                raise StopAsyncIteration
            raise item
        return item

    async def aclose(self) -> None:
        self._withdraw()

    def _withdraw(self) -> None:
        if not self._over:
            self._over = True
            self._pending.cancelled.set()
            self._wakeup.set()


@dataclass
class _Sequence:
    owner: _Pending
    index: int
    sampler: SamplerState
    detok: IncrementalDetokenizer
    position: int = 0  # position of ``next_token`` (its multimodal-rope offset apart)
    rope_delta: int = 0
    next_token: int = -1
    generated: int = 0
    finished: bool = False


@dataclass
class _Prompt:
    """A text prompt being prefilled in chunks: ``done`` of its tokens are in the staging cache."""

    owner: _Pending
    token_ids: list[int]
    done: int = 0
    rope_delta: int = 0  # multimodal-rope offset of the text left (a media prompt resumed after a cached prefix)

    @property
    def left(self) -> int:
        return len(self.token_ids) - self.done


class TransformersEngine(Engine[Any]):
    """The reference engine: the checkpoint run by transformers, batched by omniserve's own worker.

    ``prepare`` only compiles a structured-output constraint (the sampler reads ``SamplingParams``
    itself); ``stream`` hands the request to the worker thread and relays what it emits.
    """

    NAME = "transformers"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._loaded: Any = None
        self._tokenizer: Any = None
        self._waiting: collections.deque[_Pending] = collections.deque()  # admitted, not yet in the batch
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._threads_wanted: int | None = None  # --threads, or the cores available (CPU only)
        self.compute_threads: int | None = None  # torch threads the worker runs with, as it reads them
        self._running: list[_Sequence] = []  # row i of ``self._cache`` is ``self._running[i]``
        self._chunking: list[_Prompt] = []  # row i of ``self._staging`` is ``self._chunking[i]``
        self._media: collections.deque[_Pending] = collections.deque()  # admitted, prefilled whole next
        self._cache: Any = None  # ``kv_cache.SlotCache`` of the running sequences, made at load
        self._staging: Any = None  # the same for text prompts being prefilled
        self.prefill_passes = 0  # forward passes that prefilled prompts (a chunk or a media prompt)
        self.media_passes: collections.Counter[int] = collections.Counter()  # media prefill passes by prompts held
        self._prefix: Any = None  # ``prefix_cache.PrefixCache`` (None: --prefix-cache-tokens 0)
        self._prefix_queries = 0  # prompt tokens looked up in it
        self._prefix_hits = 0  # ... and found there
        self._media_token_ids: frozenset[int] = frozenset()  # placeholder ids media embeddings replace
        self._encoders: Any = None  # ``encoder_cache.EncoderCache`` (None: --encoder-cache-items 0)
        self._stale_adapters: list[str] = []  # unloaded adapters whose cached prefixes the worker drops
        self._grammars: Any = None  # ``structured.grammar.GrammarCache``, made at the first constrained request
        self._reserved = 0  # sequences running or being admitted
        self._outbox = _Outbox()
        # when the worker last finished a step (prefill, decode, idle wait): for ``stalled_for``
        self._progress_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def launch(self) -> ModelInfo:
        info = await asyncio.to_thread(_no_stop_iteration, self._load)
        self._thread = threading.Thread(target=self._worker, name="omniserve-transformers", daemon=True)
        self._thread.start()
        return info

    def _load(self) -> ModelInfo:
        from transformers import AutoTokenizer

        from omniserve.engines.compute import choose_dtype, configure_threads
        from omniserve.engines.hf_model import load_model, new_cache

        cfg = self._config
        dtype = choose_dtype(cfg.dtype, cfg.device)
        self._threads_wanted = configure_threads(cfg.threads) if cfg.device == "cpu" else None  # (the warm-up's)
        log.info(
            "transformers engine: dtype %s (%s)%s",
            dtype.name,
            dtype.reason,
            f", {self._threads_wanted} compute threads" if self._threads_wanted else "",
        )
        self._loaded = load_model(cfg.model, dtype=dtype.name, device=cfg.device, linear_kernel=cfg.linear_kernel)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer of {cfg.model}: {exc}") from exc
        max_len = cfg.max_model_len or self._loaded.max_position_embeddings
        self._warmup()
        rows = cfg.max_concurrency
        if cfg.prefix_cache_tokens > 0:
            from omniserve.engines.prefix_cache import PrefixCache

            self._prefix = PrefixCache(cfg.prefix_cache_tokens)
            from omniserve.engines.hf_model import placeholder_ids

            self._media_token_ids = placeholder_ids(self._loaded)
        if cfg.encoder_cache_items > 0:
            from omniserve.engines.encoder_cache import EncoderCache

            self._encoders = EncoderCache(cfg.encoder_cache_items)
        self._cache = new_cache(self._loaded, rows)
        self._staging = new_cache(self._loaded, rows)
        return self.served(max_len, [*self._loaded.eos_token_ids, self._tokenizer.eos_token_id])

    def _warmup(self) -> None:
        """Run one prefill and one decode step so readiness means 'can generate', not 'loaded'."""
        from omniserve.engines.hf_model import decode_step, new_cache, prefill_chunk

        ids = list(self._tokenizer("warm up")["input_ids"] or [0])
        staging, cache = new_cache(self._loaded, 1, len(ids)), new_cache(self._loaded, 1, len(ids) + 1)
        staging.add_rows(1)
        logits = prefill_chunk(self._loaded, staging, [ids], [0], [None])
        cache.append_copies(staging, 0, 0, len(ids), 1)
        decode_step(self._loaded, cache, [int(logits[0].argmax())], [len(ids)], [None])

    def shutdown(self) -> None:
        self._halt.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(30)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._halt.is_set()

    # ------------------------------------------------------------------ LoRA (omniserve/lora/peft_batch.py)

    def check_adapter(self, adapter: LoraAdapter) -> None:
        """Every module the adapter touches must exist in the served module (towers and projectors too)."""
        self._lora().check_adapter(adapter)

    async def load_adapter(self, adapter: LoraAdapter) -> None:
        await self._lora().load_adapter(adapter)

    async def unload_adapter(self, name: str) -> None:
        with self._lock:  # the worker drops its cached prefixes before admitting anything more
            self._stale_adapters.append(name)
        await self._lora().unload_adapter(name)

    def _lora(self) -> Any:
        from omniserve.lora.peft_batch import TransformersLora

        return TransformersLora(self._loaded.model)

    def kv_cache_usage(self) -> float | None:
        """Tokens held in the caches (running and prefilling rows) over the slots their buffers have now.

        The buffers grow with the longest context they have had to hold, up to a full batch of full
        contexts: a high value says the next long prompt makes them grow (or, at the top, that the
        batch is full of long contexts).
        """
        caches = [c for c in (self._cache, self._staging) if c is not None]
        if not caches or self._info is None:
            return None
        used = sum(c.tokens() for c in caches)  # read while the worker runs: a scrape may be a step behind
        return min(1.0, used / max(1, sum(c.slots() for c in caches)))

    def prefix_cache_counts(self) -> tuple[int, int] | None:
        return None if self._prefix is None else (self._prefix_queries, self._prefix_hits)

    def stalled_for(self) -> float:
        """Seconds since the worker last finished a step, while requests are queued or running."""
        if not (self._running or self._waiting or self._chunking or self._media):
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    # ------------------------------------------------------------------ async side

    def prepare(self, request: GenerationRequest) -> Any:
        """The request's grammar compiled (cached), so one the library refuses is a 400; else nothing to map."""
        spec = request.sampling.structured
        if spec is None:
            return None
        if self._grammars is None:
            from omniserve.structured.grammar import GrammarCache

            vocab = self._loaded.model.config.get_text_config().vocab_size
            self._grammars = GrammarCache(self._tokenizer, vocab)
        return self._grammars.compile(spec)

    def stream(self, request: GenerationRequest, native: Any) -> AsyncIterator[ChoiceDelta]:
        """Queue the request for the worker now (``generate`` admitted it) and relay what it emits.

        Queued at once rather than at the first iteration, so the worker may prefill while the
        gateway is still sending the response's first bytes; ``_Relay`` withdraws it when closed.
        """
        pending = _Pending(
            request=request,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            outbox=self._outbox,
            grammar=native,
        )
        with self._lock:  # the worker fails what is queued when it exits: never queue behind its back
            if self._halt.is_set():
                raise EngineUnavailable(f"the {self.NAME} engine is shutting down")
            self._waiting.append(pending)
        self._wakeup.set()
        return _Relay(pending, self._wakeup)

    # ------------------------------------------------------------------ worker thread

    def _worker(self) -> None:
        if self._threads_wanted:
            import torch

            # torch's intra-op thread count is a per-thread OpenMP setting: set it where the compute runs
            torch.set_num_threads(self._threads_wanted)
            self.compute_threads = torch.get_num_threads()
        ending: Exception = EngineUnavailable("the engine is shutting down")
        try:
            while not self._halt.is_set():
                try:
                    self._admit()
                    self._drop_cancelled()
                    if not (self._running or self._chunking or self._media):
                        self._outbox.flush()  # before sleeping: a request may have finished at its first token
                        self._wakeup.wait(0.5)
                        self._wakeup.clear()
                        continue
                    self._prefill_step()
                    if self._running:
                        self._decode_step()
                except Exception as exc:  # a failure must fail the requests, never the worker
                    log.exception("decode step failed")
                    self._fail_running(EngineError(f"generation failed: {exc}"))
                finally:
                    self._progress_at = time.monotonic()
                    self._outbox.flush()
        except BaseException as exc:
            # Ended by something that is not an Exception (SystemExit from a library, an exception injected
            # into the thread): the thread is gone either way. Say so loudly and fail its requests rather
            # than leave them waiting forever; ``alive`` keeps /health red from here on.
            log.critical("the %s engine's worker thread died: %r", self.NAME, exc, exc_info=exc)
            ending = EngineUnavailable(
                f"the {self.NAME} engine stopped ({type(exc).__name__}: {exc}); retry on another replica"
            )
        finally:
            with self._lock:  # ``stream`` checks it under the lock: nothing is queued behind our back
                self._halt.set()
            self._abandon_all(ending)
            self._outbox.flush()

    def _next_admissible(self) -> _Pending | None:
        with self._lock:
            if any(p.cancelled.is_set() for p in self._waiting):
                # a client that left while queued is never prefilled (its admission was given back on close)
                for dropped in [p for p in self._waiting if p.cancelled.is_set()]:
                    dropped.emit(_DONE)
                self._waiting = collections.deque(p for p in self._waiting if not p.cancelled.is_set())
            if not self._waiting:
                return None
            if self._reserved + self._waiting[0].request.sampling.n > self._config.max_concurrency:
                return None
            pending = self._waiting.popleft()
            self._reserved += pending.request.sampling.n
            return pending

    def _admit(self) -> None:
        """Take every request a batch slot is free for: text joins the chunked prefill, media waits its turn.

        With the prefix cache, a prompt starts from its longest cached prefix; a media prompt does only if
        that prefix holds all its media (what is left is then text: it joins the chunked prefill).
        """
        self._drop_stale_adapters()
        while (pending := self._next_admissible()) is not None:
            try:
                self._admit_one(pending)
            except Exception as exc:  # popped from the queue: fail it here or nobody will
                log.exception("admission failed")
                self._release(pending.request.sampling.n)
                pending.emit(EngineError(f"could not process the prompt: {exc}"))

    def _admit_one(self, pending: _Pending) -> None:
        prompt = pending.request.prompt
        if not prompt.token_ids:
            self._release(pending.request.sampling.n)
            pending.emit(EngineError("could not process the prompt: it has no tokens"))
            return
        try:
            reused, rope_delta = self._reuse_prefix(pending) if self._prefix is not None else (None, 0)
        except Exception:  # the cache is an optimisation: a failed lookup costs only the recomputation
            log.exception("prefix cache lookup failed")
            reused, rope_delta = None, 0
        if prompt.mm_inputs and reused is None:
            self._media.append(pending)
            return
        if reused is None:
            self._staging.add_rows(1)  # starts at the staging cache's current column
            done = 0
        else:
            self._staging.append_prefix(reused)
            done = reused[0][0].shape[1]
            # the media are in the reused KV: let the processor's tensors go, the rest is text
            pending.request.prompt = dataclasses.replace(prompt, mm_inputs={}, media=[])
        self._chunking.append(_Prompt(pending, list(prompt.token_ids), done, rope_delta))

    def _reuse_prefix(self, pending: _Pending) -> tuple[Any, int]:
        """The cached prefix KV this prompt can start from (None: none) and the rope offset of what follows."""
        from omniserve.engines.prefix_cache import PrefixKey, media_digest

        req = pending.request
        if req.prompt.mm_inputs and self._loaded.cross_attention is not None:
            return None, 0  # with cross-attention even its first tokens depend on its images: never cached
        tokens = req.prompt.token_ids
        key = PrefixKey(adapter=req.adapter.name if req.adapter is not None else None)
        last_media = None
        if req.prompt.mm_inputs:
            marks = [i for i, t in enumerate(tokens) if t in self._media_token_ids]
            # placeholders unknown for this model: every block is salted with the media, and none is reused
            key.first_media = marks[0] if marks else 0
            last_media = marks[-1] if marks else len(tokens)
            key.media = media_digest(req.prompt.mm_inputs)
        pending.prefix_key = key
        self._prefix_queries += len(tokens)
        match = self._prefix.match(tokens, key)
        if match.length == 0 or (last_media is not None and match.length <= last_media):
            return None, 0
        self._prefix_hits += match.length
        return self._prefix.load(match), match.rope_delta

    def _store_prefix(self, pending: _Pending, tokens: list[int], cache: Any, row: int, rope_delta: int) -> None:
        """Keep the prompt's KV (``cache`` row ``row``, from the row's first column) for the next prompts."""
        if self._prefix is None or pending.prefix_key is None:
            return
        first = cache.starts[row]
        self._prefix.store(tokens, pending.prefix_key, lambda a, b: cache.row_kv(row, first + a, first + b), rope_delta)

    def _drop_stale_adapters(self) -> None:
        with self._lock:
            names, self._stale_adapters = self._stale_adapters, []
        for name in names:
            for cache in (self._prefix, self._encoders):
                if cache is not None:
                    cache.drop_adapter(name)

    def _prefill_step(self) -> None:
        """At most one media prefill pass (one or more media prompts whole), then one chunk of every text prompt.

        The chunk's width is what ``max_batch_tokens`` leaves after one token per running sequence
        (and the media pass's tokens), split over the prompts being prefilled, at least one each.
        """
        budget = self._config.max_batch_tokens - len(self._running)
        if self._media:
            group = self._media_group(budget)
            budget -= len(group) * max(len(p.request.prompt.token_ids) for p in group)
            try:
                self._prefill_media(group)
            except Exception as exc:
                if len(group) == 1:
                    self._fail_media(group[0], exc)
                else:  # one prompt's media may be what failed: never let it fail the others
                    log.exception("batched media prefill failed; prefilling each prompt alone")
                    for pending in group:
                        try:
                            self._prefill_media([pending])
                        except Exception as alone_exc:
                            self._fail_media(pending, alone_exc)
            self.prefill_passes += 1
        if self._chunking:
            try:
                self._prefill_chunk(max(1, budget // len(self._chunking)))
            except Exception as exc:
                log.exception("prefill failed")
                failed, self._chunking = self._chunking, []
                while self._staging.rows:
                    self._staging.remove_row(self._staging.rows - 1)
                for prompt in failed:
                    self._release(prompt.owner.request.sampling.n)
                    prompt.owner.emit(EngineError(f"could not process the prompt: {exc}"))
            self.prefill_passes += 1

    def _media_group(self, budget: int) -> list[_Pending]:
        """The media prompts of the next pass, taken from the queue: the first one waiting, and after it those
        whose media join its batch (``hf_model.layouts_join``) under the same adapter, while the padded
        pass (rows x longest prompt) stays within ``budget``. The first goes alone if it is over budget."""
        from omniserve.engines.hf_model import layouts_join, media_layout

        first = self._media.popleft()
        group = [first]
        layout = media_layout(first.request.prompt.mm_inputs)
        width = len(first.request.prompt.token_ids)
        if layout is None or width > budget:
            return group
        adapter = first.request.adapter.name if first.request.adapter is not None else None
        for pending in list(self._media):
            req = pending.request
            wider = max(width, len(req.prompt.token_ids))
            if (len(group) + 1) * wider > budget:
                continue  # a shorter one further back may still fit
            if (req.adapter.name if req.adapter is not None else None) != adapter:
                continue  # a tower encodes one adapter's media per pass (lora.peft_batch)
            if not layouts_join(layout, media_layout(req.prompt.mm_inputs)):
                continue
            group.append(pending)
            width = wider
            self._media.remove(pending)
        return group

    def _fail_media(self, pending: _Pending, exc: Exception) -> None:
        log.error("prefill failed", exc_info=exc)
        self._release(pending.request.sampling.n)
        pending.emit(EngineError(f"could not process the prompt: {exc}"))

    def _prefill_media(self, group: list[_Pending]) -> None:
        """Prefill ``group``'s prompts whole in one pass on a fresh cache; each request's choices then start.

        Raises only if the pass failed (nothing has started then); a row that fails to start fails alone."""
        import omniserve.engines.hf_model as hf_model

        reqs = [p.request for p in group]
        lengths = [len(r.prompt.token_ids) for r in reqs]
        batch = hf_model.new_cache(self._loaded, len(group), max(lengths))
        self.media_passes[len(group)] += 1
        if len(group) == 1:
            logits, delta = hf_model.prefill_alone(
                self._loaded, batch, reqs[0].prompt.token_ids, reqs[0].prompt.mm_inputs, reqs, self._encoders
            )
            logits, deltas = logits[None], None if delta is None else [delta]
        else:
            logits, deltas = hf_model.prefill_media(
                self._loaded,
                batch,
                [r.prompt.token_ids for r in reqs],
                [r.prompt.mm_inputs for r in reqs],
                reqs,
                self._encoders,
            )
        for row, (pending, length) in enumerate(zip(group, lengths, strict=True)):
            req = pending.request
            rope_delta = deltas[row] if deltas is not None else 0
            # the KV cache now holds what the media meant: let the decoded media and the processor's tensors go
            # (pixel values, audio features) rather than keep them until the last token of the longest choice
            req.prompt = dataclasses.replace(req.prompt, mm_inputs={}, media=[])
            try:
                self._store_prefix(pending, req.prompt.token_ids, batch, row, rope_delta)
                first = batch.starts[row]
                self._start_sequences(pending, batch, row, first, first + length, logits[row], rope_delta)
            except Exception as exc:
                self._fail_media(pending, exc)

    def _prefill_chunk(self, width: int) -> None:
        """The next ``width`` tokens (or what is left) of every text prompt in one pass; finished ones start."""
        from omniserve.engines.hf_model import prefill_chunk

        prompts = self._chunking
        pieces = [p.token_ids[p.done : p.done + width] for p in prompts]
        logits = prefill_chunk(
            self._loaded,
            self._staging,
            pieces,
            [p.done + p.rope_delta for p in prompts],
            [p.owner.request for p in prompts],
        )
        for prompt, piece in zip(prompts, pieces, strict=True):
            prompt.done += len(piece)
        for row in reversed(range(len(prompts))):  # from the end: a removed row's slot gets the last row
            prompt = prompts[row]
            if prompt.left:
                continue
            start = self._staging.starts[row]
            self._store_prefix(prompt.owner, prompt.token_ids, self._staging, row, prompt.rope_delta)
            self._start_sequences(
                prompt.owner, self._staging, row, start, start + prompt.done, logits[row], prompt.rope_delta
            )
            self._staging.remove_row(row)
            prompts[row] = prompts[-1]
            prompts.pop()

    def _start_sequences(
        self, pending: _Pending, source: Any, row: int, first: int, last: int, logits: Any, rope_delta: int
    ) -> None:
        """The request's ``n`` choices join the batch from its prefilled prompt (columns ``first..last``
        of ``source``'s ``row``), each sampling its first token from ``logits``."""
        req = pending.request
        seqs = [
            _Sequence(
                owner=pending,
                index=i,
                sampler=SamplerState.create(req.sampling, i, self._eos_for(req), pending.grammar),
                detok=IncrementalDetokenizer(self._tokenizer, req.sampling.stop, req.sampling.keep_special),
                position=last - first,
                rope_delta=rope_delta,
            )
            for i in range(req.sampling.n)
        ]
        pending.open_choices = len(seqs)
        sampled = sample_rows(logits.unsqueeze(0).expand(len(seqs), -1), [s.sampler for s in seqs])
        self._cache.append_copies(source, row, first, last, len(seqs))
        self._running.extend(seqs)
        self._advance(seqs, sampled)

    def _eos_for(self, req: GenerationRequest) -> tuple[int, ...]:
        """The ids that end this request's choices: ``stop_token_ids``, and EOS unless ``ignore_eos`` (as vLLM)."""
        eos = () if req.sampling.ignore_eos else self.model_info.eos_token_ids
        return tuple(dict.fromkeys([*eos, *req.sampling.stop_token_ids]))

    def _decode_step(self) -> None:
        from omniserve.engines.hf_model import decode_step

        seqs = self._running
        positions = [s.position + s.rope_delta for s in seqs]
        logits = decode_step(
            self._loaded, self._cache, [s.next_token for s in seqs], positions, [s.owner.request for s in seqs]
        )
        for seq in seqs:
            seq.position += 1
        self._decode_steps += 1
        self._decoded_tokens += len(self._running)
        sampled = sample_rows(logits, [s.sampler for s in self._running])
        self._advance(self._running, sampled)

    def _advance(self, seqs: list[_Sequence], sampled: list[Sampled]) -> None:
        """Record each sequence's new token, emit its text, and retire finished ones."""
        max_len = self.model_info.max_model_len
        for seq, pick in zip(seqs, sampled, strict=True):
            self._accept_token(seq, pick, max_len)
        self._retire_finished()

    def _accept_token(self, seq: _Sequence, pick: Sampled, max_len: int) -> None:
        params = seq.owner.request.sampling
        seq.generated += 1
        seq.next_token = pick.token_id
        logprobs = self._logprobs(pick) if params.logprobs else None
        if pick.token_id in seq.sampler.eos_ids:
            self._finish(seq, seq.detok.flush(), "stop", [pick.token_id], logprobs)
            return
        text, hit_stop = seq.detok.add(pick.token_id)
        if hit_stop or seq.sampler.grammar_ended:  # a grammar that ended: the output is complete
            text = text if hit_stop else text + seq.detok.flush()
            self._finish(seq, text, "stop", [pick.token_id], logprobs)
            return
        prompt_len = len(seq.owner.request.prompt.token_ids)
        if seq.generated >= params.max_tokens or prompt_len + seq.generated >= max_len:
            self._finish(seq, text + seq.detok.flush(), "length", [pick.token_id], logprobs)
            return
        seq.owner.emit(ChoiceDelta(index=seq.index, text=text, token_ids=[pick.token_id], logprobs=logprobs))

    def _logprobs(self, pick: Sampled) -> list[TokenLogprobs]:
        return [TokenLogprobs.decoded(self._tokenizer, pick.token_id, pick.logprob or 0.0, pick.top)]

    def _finish(
        self, seq: _Sequence, text: str, reason: str, token_ids: list[int], logprobs: list[TokenLogprobs] | None
    ) -> None:
        seq.finished = True
        seq.owner.emit(
            ChoiceDelta(index=seq.index, text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=reason)
        )
        seq.owner.open_choices -= 1
        if seq.owner.open_choices == 0:
            seq.owner.emit(_DONE)

    def _retire_finished(self) -> None:
        """Take finished sequences out of the batch; each one's cache row gets the last row (no re-padding)."""
        gone = [s for s in self._running if s.finished]
        if not gone:
            return
        running = self._running
        for row in reversed(range(len(running))):  # from the end: the row moved into a gap is never finished
            if running[row].finished:
                self._cache.remove_row(row)
                running[row] = running[-1]
                running.pop()
        self._release_sequences(gone)

    def _release_sequences(self, gone: list[_Sequence]) -> None:
        with self._lock:
            self._reserved -= len(gone)

    def _release(self, sequences: int) -> None:
        with self._lock:
            self._reserved -= sequences

    def _drop_cancelled(self) -> None:
        """Withdraw what belongs to clients that left: prompts not yet prefilled, and running sequences."""
        for pending in [p for p in self._media if p.cancelled.is_set()]:
            self._media.remove(pending)
            self._release(pending.request.sampling.n)
            pending.emit(_DONE)
        for row in reversed(range(len(self._chunking))):
            prompt = self._chunking[row]
            if prompt.owner.cancelled.is_set():
                self._staging.remove_row(row)
                self._chunking[row] = self._chunking[-1]
                self._chunking.pop()
                self._release(prompt.owner.request.sampling.n)
                prompt.owner.emit(_DONE)
        for seq in self._running:
            if seq.owner.cancelled.is_set() and not seq.finished:
                seq.finished = True
                seq.owner.open_choices -= 1
                if seq.owner.open_choices == 0:
                    seq.owner.emit(_DONE)
        self._retire_finished()

    def _fail_running(self, error: Exception) -> None:
        owners = {id(s.owner): s.owner for s in self._running}
        for seq in self._running:
            seq.finished = True
            seq.owner.open_choices = 0
        self._retire_finished()
        for owner in owners.values():
            owner.emit(error)

    def _abandon_all(self, error: Exception) -> None:
        """Fail every request queued, being prefilled or running, as the worker ends.

        The batch is left alone: a worker that died may have died half-way through a step.
        """
        owners = {id(s.owner): s.owner for s in self._running if not s.finished}
        for pending in [*(p.owner for p in self._chunking), *self._media]:
            owners[id(pending)] = pending
        self._running, self._chunking, self._media = [], [], collections.deque()
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._reserved = 0
        for owner in [*owners.values(), *waiting]:
            owner.emit(error)


def _no_stop_iteration(function: Callable[[], ModelInfo]) -> ModelInfo:
    """``function()``, a ``StopIteration`` it lets out (a ``next()`` on an empty iterator somewhere in a loader) raised
    as a ``RuntimeError``: asyncio cannot set a ``StopIteration`` on a future, so ``launch`` would wait forever."""
    try:
        return function()
    except StopIteration as exc:
        raise RuntimeError(f"loading the model stopped on an exhausted iterator: {exc!r}") from exc
