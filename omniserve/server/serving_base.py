"""The shape every generation endpoint follows: validate -> render -> submit -> stream or collect.

An endpoint fills in three hooks (``prepare``, ``chunks``, ``collect``), so none can forget
validation, model checks, admission, cancellation or metrics, which live here once.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from omniserve.config import EngineConfig, ServerConfig
from omniserve.engines.base import ChoiceDelta, Engine, GenerationRequest
from omniserve.engines.streams import close_stream, merge_streams
from omniserve.errors import InvalidRequest, ModelNotFound, OmniServeError
from omniserve.lora.adapter import LoraAdapter
from omniserve.lora.registry import LoraRegistry, leased
from omniserve.media.budget import MediaGate
from omniserve.protocol import Usage
from omniserve.server.drain import Drain
from omniserve.server.errors import parse_body
from omniserve.server.metrics import Metrics
from omniserve.server.sse import DONE, sse_error, sse_event
from omniserve.server.threads import Rendering
from omniserve.templates.render import PromptRenderer

RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")
#: The status recorded for a request whose client left before the answer (nginx's convention; never sent).
CLIENT_CLOSED_REQUEST = 499


@dataclass
class ServingContext:
    engine: Engine
    renderer: PromptRenderer
    server: ServerConfig
    engine_config: EngineConfig
    metrics: Metrics
    drain: Drain  # refuses new work once shutting down; cuts running work off at the drain timeout
    rendering: Rendering  # renders prompts in threads media work cannot take
    media_gate: MediaGate  # bounds concurrent decodes and decoded bytes across all of the app's requests
    loras: LoraRegistry | None = None  # LoRA adapters served beside the base; None: none can be

    @property
    def model_name(self) -> str:
        return self.engine_config.served_model_name

    def resolve_model(self, name: str) -> LoraAdapter | None:
        """The LoRA adapter a request's ``model`` names, None for the base model; 404 for any other name."""
        if self.loras is None:
            self.check_model(name)
            return None
        return self.loras.resolve(name)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ModelNotFound(
                f"The model '{name}' does not exist; this server serves '{self.model_name}'", param="model"
            )


@dataclass
class Timing:
    """Where a request's time went, for TTFT, latency and the gateway's own overhead."""

    arrived: float = field(default_factory=time.perf_counter)
    engine_started: float | None = None
    first_token: float | None = None
    engine_finished: float | None = None

    def mark_token(self) -> None:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.engine_finished = now


@dataclass
class Submitted:
    """A request admitted by the engine: its generation requests and their delta streams."""

    jobs: list[GenerationRequest]
    streams: list[AsyncIterator[ChoiceDelta]]
    timing: Timing
    completion_tokens: int = 0
    _merged: AsyncIterator[tuple[int, ChoiceDelta]] | None = None
    drain: Drain | None = None  # each wait for the next delta ends at the drain timeout

    def deltas(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """Every delta of every job as it arrives, with the job's index; keeps timing and counts."""
        self._merged = merge_streams(self.streams)
        return self._counted(self._merged)

    async def close(self) -> None:
        """End every job's stream, aborting what still runs in the engine and giving its places back.

        The merge goes first: it ends the tasks that iterate the streams, and a stream cannot be
        closed while another task is iterating it.
        """
        if self._merged is not None:
            await close_stream(self._merged)
        for stream in self.streams:  # also those never iterated: their admission is given back
            await close_stream(stream)

    async def _counted(self, source: AsyncIterator[tuple[int, ChoiceDelta]]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        while True:
            step = anext(source)
            try:
                job_index, delta = await (step if self.drain is None else self.drain.bounded(step))
            except StopAsyncIteration:
                return
            if delta.token_ids:
                self.timing.mark_token()
                self.completion_tokens += len(delta.token_ids)
            yield job_index, delta

    @property
    def prompt_tokens(self) -> int:
        return sum(job.prompt.num_tokens for job in self.jobs)

    def usage(self) -> Usage:
        prompt = self.prompt_tokens
        return Usage(
            prompt_tokens=prompt, completion_tokens=self.completion_tokens, total_tokens=prompt + self.completion_tokens
        )


class OpenAIServing(abc.ABC, Generic[RequestT]):
    request_model: type[RequestT]
    endpoint: str

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    # ---------------------------------------------------------------- hooks

    @abc.abstractmethod
    async def prepare(self, request: RequestT) -> list[GenerationRequest]:
        """Turn a validated request into engine requests (media loaded, prompt rendered)."""

    @abc.abstractmethod
    def chunks(self, request: RequestT, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        """Stream: yield OpenAI chunk objects."""

    @abc.abstractmethod
    async def collect(self, request: RequestT, submitted: Submitted) -> dict[str, Any]:
        """Non-stream: return the whole response object."""

    async def parse(self, http_request: Request) -> RequestT:
        """The validated request from the HTTP body: JSON by default (the audio endpoints read a form)."""
        return parse_body(self.request_model, await http_request.body())

    def response(self, request: RequestT, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """The non-streamed answer: JSON by default (the audio endpoints also answer text and subtitles)."""
        return JSONResponse(body, headers=headers)

    # ---------------------------------------------------------------- template method

    async def handle(self, http_request: Request) -> Response:
        timing = Timing()
        self.ctx.drain.check_admitting()  # shutting down: 503 + Retry-After before reading anything
        request = await self.parse(http_request)
        adapter = self.ctx.resolve_model(request.model)  # type: ignore[attr-defined]
        n = request.n  # type: ignore[attr-defined]
        if n > self.ctx.engine_config.max_n:
            raise InvalidRequest(f"n must be at most {self.ctx.engine_config.max_n}", param="n")
        jobs = await self.ctx.drain.bounded(self.prepare(request))
        for job in jobs:
            job.adapter = adapter
        submitted = await self._submit_with(adapter, jobs, timing)
        if request.stream:  # type: ignore[attr-defined]
            return StreamingResponse(
                self._sse(request, submitted),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        body = await until_disconnect(http_request, self.collect(request, submitted), abandoned=submitted.close)
        if body is None:  # the client left: nobody to answer, no latency to record
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        overhead, engine = self._observe(submitted)
        # Server-Timing lets clients and benchmarks see where the time went without scraping metrics
        return self.response(
            request, body, {"Server-Timing": f"gateway;dur={overhead * 1000:.3f}, engine;dur={engine * 1000:.3f}"}
        )

    async def _submit_with(
        self, adapter: LoraAdapter | None, jobs: list[GenerationRequest], timing: Timing
    ) -> Submitted:
        """``_submit``, holding the request's LoRA adapter (resident, not unloaded) until its streams end."""
        if adapter is None or self.ctx.loras is None:
            return self._submit(jobs, timing)
        lease = await self.ctx.drain.bounded(self.ctx.loras.acquire(adapter.name))
        try:
            submitted = self._submit(jobs, timing)
        except BaseException:
            lease.release()
            raise
        submitted.streams = list(leased(submitted.streams, [job.sampling.n for job in jobs], lease))
        return submitted

    def _submit(self, jobs: list[GenerationRequest], timing: Timing) -> Submitted:
        timing.engine_started = time.perf_counter()
        # all jobs (a batch of prompts) admitted at once or none: a refusal leaves nothing running
        streams = self.ctx.engine.generate_all(jobs)
        return Submitted(jobs=jobs, streams=streams, timing=timing, drain=self.ctx.drain)

    async def _sse(self, request: RequestT, submitted: Submitted) -> AsyncIterator[str]:
        try:
            async for chunk in self.chunks(request, submitted):
                yield sse_event(chunk)
        except OmniServeError as exc:
            yield sse_error(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a stream that already started must end with an error event
            yield sse_error(OmniServeError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))
        finally:
            await submitted.close()
        yield DONE
        self._observe(submitted)

    def _observe(self, submitted: Submitted) -> tuple[float, float]:
        """Record the request's metrics; return (gateway overhead, engine time) in seconds."""
        m, t = self.ctx.metrics, submitted.timing
        end = time.perf_counter()
        adapter = submitted.jobs[0].adapter if submitted.jobs else None
        label = adapter.name if adapter is not None else self.ctx.model_name  # served names only: bounded
        m.prompt_tokens.labels(label).inc(submitted.prompt_tokens)
        m.completion_tokens.labels(label).inc(submitted.completion_tokens)
        m.latency_of(self.endpoint, label).observe(end - t.arrived)
        if t.first_token is not None:
            m.ttft.labels(label).observe(t.first_token - t.arrived)
        engine = (t.engine_finished - t.engine_started) if t.engine_started and t.engine_finished else 0.0
        overhead = max(0.0, (end - t.arrived) - engine)
        m.gateway_overhead.observe(overhead)
        return overhead, engine


async def until_disconnect(
    http_request: Request, work: Awaitable[T], *, abandoned: Callable[[], Awaitable[None]] | None = None
) -> T | None:
    """Await ``work`` but abandon it if the client disconnects first: then None. Abandoned work is cancelled and
    let unwind before ``abandoned`` runs (e.g. closing the engine streams, which frees their slots: not while the
    work still uses them)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(http_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            if abandoned is not None:
                await abandoned()
    return None if task.cancelled() else task.result()


async def _wait_disconnect(http_request: Request) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return
