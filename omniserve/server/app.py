"""The composition root: wires engine, template layer, auth, limits, metrics and routes into one app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omniserve import __version__
from omniserve.config import EngineConfig, ServerConfig
from omniserve.engines.base import Engine
from omniserve.errors import ModelLoadError
from omniserve.lora.serving import build_lora_router, start_loras
from omniserve.media.budget import MediaGate
from omniserve.responses_store import open_store
from omniserve.server.auth import ApiKeyAuth
from omniserve.server.body_limit import BodyLimitMiddleware
from omniserve.server.drain import CloseWhileDraining, Drain
from omniserve.server.errors import install_error_handlers
from omniserve.server.metrics import Metrics
from omniserve.server.playground import build_playground_router, ui_enabled
from omniserve.server.routes import build_router
from omniserve.server.serving_base import ServingContext
from omniserve.server.threads import Rendering, media_pool
from omniserve.speech.synthesizer import SpeechSynthesizer
from omniserve.templates.render import PromptRenderer

log = logging.getLogger(__name__)

_COUNTED_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/audio/speech",
    "/v1/models",
    "/health",
    "/health/live",
}


class StartFailureReport:
    """Report a model that fails to load as its one-line message, not as a traceback.

    uvicorn logs whatever text the app sends with ``lifespan.startup.failed``, and Starlette sends the
    whole traceback. A ``ModelLoadError`` already says what failed and how to fix it (engine, model,
    cause, fix), so that message is sent instead; other start-up errors keep their traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def report(message: Message) -> None:
            failure = getattr(scope["app"].state, "start_failure", None)
            if message["type"] == "lifespan.startup.failed" and failure is not None:
                message = {**message, "message": str(failure)}
            await send(message)

        await self.app(scope, receive, report)


class RequestCounter:
    """Counts finished requests by path and status code (streams count with their 200)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in _COUNTED_PATHS else "other", str(status)).inc()


def build_app(engine: Engine, engine_config: EngineConfig, server_config: ServerConfig) -> FastAPI:
    # begun by `omniserve deploy`'s signal handling (server/drain.py), read by every request and /health
    drain = Drain(server_config.drain_delay_seconds, server_config.drain_timeout_seconds)
    metrics = Metrics(engine, engine_config.served_model_name, drain)
    media_gate = MediaGate(server_config.media)  # one per app: decoding is bounded across all its requests

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The loop's default pool (asyncio.to_thread: media decoding) is the app's, sized for it, from
        # the start; rendering and the engine have threads of their own (server/threads.py).
        pool = media_pool(server_config.media)
        asyncio.get_running_loop().set_default_executor(pool)
        try:
            ctx = await _start(app)
            try:
                try:
                    app.state.speech = await asyncio.to_thread(_load_speech)  # None: the checkpoint cannot speak
                except ModelLoadError as exc:
                    app.state.start_failure = exc  # one line, as an engine that fails to load
                    raise
                yield
            finally:
                if app.state.speech is not None:
                    app.state.speech.close()
                await engine.stop()
                ctx.rendering.close()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if app.state.responses_store is not None:  # its connection (a file, a PostgreSQL session) goes too
                app.state.responses_store.close()

    async def _start(app: FastAPI) -> ServingContext:
        # One after the other: transformers' lazy imports are not safe from two threads at once
        # (a concurrent first import fails with "cannot import name 'AutoProcessor'").
        try:
            await engine.start()
            loras = await start_loras(engine, engine_config, server_config)  # --lora adapters, checked and loaded
        except ModelLoadError as exc:
            app.state.start_failure = exc  # reported by StartFailureReport and `omniserve deploy`'s exit code
            raise
        renderer = await asyncio.to_thread(PromptRenderer.from_pretrained, engine_config.model)
        renderer.max_model_len = engine.model_info.max_model_len
        media_renderer = renderer
        if renderer.modalities != {"text"}:  # a second tokenizer and lock, so text never waits for media
            media_renderer = await asyncio.to_thread(PromptRenderer.from_pretrained, engine_config.model)
            media_renderer.max_model_len = renderer.max_model_len
        app.state.ctx = ServingContext(
            engine=engine,
            renderer=renderer,
            server=server_config,
            engine_config=engine_config,
            metrics=metrics,
            drain=drain,
            rendering=Rendering(renderer, media_renderer),
            media_gate=media_gate,
            loras=loras,
        )
        metrics.loras = loras
        log.info("serving %s on the %s engine", engine_config.served_model_name, type(engine).__name__)
        if ui_enabled(server_config):
            host = f"[{server_config.host}]" if ":" in server_config.host else server_config.host
            log.info("playground: http://%s:%d/ (--no-ui turns it off)", host, server_config.port)
        return app.state.ctx

    def _load_speech() -> SpeechSynthesizer | None:
        """The talker and codec beside the engine, loaded after it (lazy imports are not thread-safe)."""
        if not server_config.speech:
            return None
        return SpeechSynthesizer.load(
            engine_config.model,
            dtype=engine_config.dtype,
            device=engine_config.device,
            max_waiting=server_config.speech_max_waiting,
            timeout_seconds=server_config.speech_timeout_seconds,
            max_seconds=server_config.speech_max_seconds,
            threads=engine_config.threads,
        )

    app = FastAPI(title="omniserve", version=__version__, lifespan=lifespan)
    app.state.drain = drain
    app.state.speech = None  # the speech component (omniserve/speech), set at start-up when the model speaks
    install_error_handlers(app, retry_after=server_config.retry_after_seconds)
    auth = ApiKeyAuth(server_config.api_keys)
    # one Responses store per app (an in-memory database is this app's own), opened now so a bad path stops
    # start-up, and closed when the app ends (a PostgreSQL connection, a file's handle)
    store = open_store(
        server_config.responses_store,
        retention_seconds=server_config.responses_retention_seconds,
        max_stored=server_config.responses_max_stored,
    )
    app.state.responses_store = store
    app.include_router(build_router(auth, metrics, server_config, drain, store))
    app.include_router(build_lora_router(server_config, auth))  # 403 unless --allow-runtime-lora
    if ui_enabled(server_config):  # the playground page: on for loopback, else only with --ui
        app.include_router(build_playground_router())
    if server_config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(server_config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)
    app.add_middleware(CloseWhileDraining, drain=drain)
    app.add_middleware(StartFailureReport)
    return app
