"""HTTP routes: a few lines each, dispatching to the serving classes."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from omniserve import __version__
from omniserve.config import ServerConfig
from omniserve.errors import EngineUnavailable, ModelNotFound
from omniserve.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    dump,
)
from omniserve.protocol_audio import Transcription, TranscriptionVerbose
from omniserve.protocol_responses import InputItemList, ResponseDeleted, ResponsesRequest, ResponseStreamEvent
from omniserve.protocol_responses import Response as ResponseObject
from omniserve.protocol_speech import SpeechRequest, VoiceList
from omniserve.responses_store import ResponsesStore
from omniserve.server.auth import ApiKeyAuth
from omniserve.server.drain import Drain, ServerDraining
from omniserve.server.errors import error_response
from omniserve.server.metrics import Metrics
from omniserve.server.serving_base import ServingContext
from omniserve.server.serving_chat import ChatServing
from omniserve.server.serving_completions import CompletionServing
from omniserve.server.serving_responses import ResponsesServing
from omniserve.server.serving_speech import SpeechServing, speech_answers
from omniserve.server.serving_transcriptions import TranscriptionServing, TranslationServing


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


# ---------------------------------------------------------------- what /openapi.json says
# Generation bodies are parsed by hand (``parse_body``: every refusal stays in OpenAI's error shape, deep
# JSON and lone surrogates included), so FastAPI cannot see them; these entries document them, and the
# answers, without changing how either is produced. Fuzzers and client generators read them.

#: Every failure is OpenAI's error object (server/errors.py); "default" also stops FastAPI from
#: documenting its own 422, which this server never sends.
_ERRORS: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorResponse, "description": "OpenAI's error object: {error: {message, type, param, code}}"}
}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``model_json_schema()`` with every ``#/$defs/..`` reference replaced by its definition.

    An operation's schema lives inside the OpenAPI document, where ``#/$defs`` points nowhere, and a router
    cannot add ``components``. The wire types are not recursive, so inlining ends. The discriminators go:
    their mappings name ``$defs`` too, and each part's ``const`` type already tells the variants apart.
    """
    defs = schema.get("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise ValueError(f"the request schema is recursive through {name}: it cannot be inlined")
            return resolve(copy.deepcopy(defs[name]), (*seen, name))
        dropped = {"$defs", "discriminator"} if "propertyName" in node.get("discriminator", {}) else {"$defs"}
        return {key: resolve(value, seen) for key, value in node.items() if key not in dropped}

    return resolve(schema, ())


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = _inline_refs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _generated(answer: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation endpoint answers JSON, or server-sent events when the request asks to ``stream``.

    OpenAPI 3.1 reads an event stream's ``schema`` as one event's: each ``data`` is a JSON chunk, or the
    error object of a stream that failed after it started, and the last is ``[DONE]``.
    """
    objects = [_inline_refs(model.model_json_schema(mode="serialization")) for model in (chunk, ErrorResponse)]
    data = {
        "anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json", "contentSchema": {"anyOf": objects}}]
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", **data}}}
    stream = {"text/event-stream": {"schema": event}}
    return {200: {"model": answer, "content": stream, "description": "the answer, or its stream"}, **_ERRORS}


def _stall(ctx: ServingContext, server: ServerConfig) -> EngineUnavailable | None:
    """An engine with work that has finished no step for ``--stall-timeout``: alive, but serving nobody."""
    stalled = ctx.engine.stalled_for()
    if stalled <= server.stall_timeout_seconds:
        return None
    return EngineUnavailable(
        f"the engine has made no progress for {stalled:.0f} s with requests waiting (--stall-timeout "
        f"{server.stall_timeout_seconds:g} s)"
    )


def build_router(
    auth: ApiKeyAuth, metrics: Metrics, server: ServerConfig, drain: Drain, store: ResponsesStore | None
) -> APIRouter:
    """Every route; ``store`` is the app's Responses store (None: off), opened and closed by the app."""
    router = APIRouter()
    api = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.get("/health", responses=_ERRORS)
    async def health(request: Request) -> Response:
        """Readiness: 200 only while this server takes new work; load balancers and probes route on it."""
        if drain.draining:
            draining = ServerDraining("this server is shutting down")
            return error_response(draining, retry_after=server.retry_after_seconds)
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None or not ctx.engine.is_ready():
            return error_response(EngineUnavailable("the engine is not ready"))
        stall = _stall(ctx, server)
        if stall is not None:
            return error_response(stall)
        return JSONResponse({"status": "ok", "model": ctx.model_name})

    @router.get("/health/live", responses=_ERRORS)
    async def live(request: Request) -> Response:
        """Liveness: 503 only when a restart would help (the engine died, or stalled). Loading and draining
        are alive: a draining server answering 503 here would be killed before its requests finish."""
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None:
            return JSONResponse({"status": "starting"})
        if not ctx.engine.alive():
            return error_response(EngineUnavailable("the engine has stopped"))
        stall = _stall(ctx, server)
        if stall is not None:
            return error_response(stall)
        return JSONResponse({"status": "draining" if drain.draining else "ok"})

    @router.get("/metrics", response_class=PlainTextResponse)  # documents the text format
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    def card(ctx: ServingContext) -> ModelCard:
        return ModelCard(id=ctx.model_name, max_model_len=ctx.engine.model_info.max_model_len)

    def cards(ctx: ServingContext) -> list[ModelCard]:
        """The base, then each LoRA adapter (``parent``: the base, ``root``: its folder), as vLLM lists them."""
        base = card(ctx)
        adapters = ctx.loras.adapters if ctx.loras is not None else []
        return [base] + [
            ModelCard(id=a.name, max_model_len=base.max_model_len, root=str(a.path), parent=ctx.model_name)
            for a in adapters
        ]

    @api.get("/models", responses={200: {"model": ModelList}, **_ERRORS})
    async def list_models(request: Request) -> dict:
        return dump(ModelList(data=cards(_ctx(request))))

    @api.get("/models/{model_id:path}", responses={200: {"model": ModelCard}, **_ERRORS})
    async def get_model(model_id: str, request: Request) -> dict:
        for found in cards(_ctx(request)):
            if found.id == model_id:
                return dump(found)
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")

    @api.post(
        "/chat/completions",
        openapi_extra=_json_body(ChatCompletionRequest),
        responses=_generated(ChatCompletion, ChatCompletionChunk),
    )
    async def chat(request: Request) -> Response:
        return await ChatServing(_ctx(request), request.app.state.speech).handle(request)

    @api.post("/completions", openapi_extra=_json_body(CompletionRequest), responses=_generated(Completion, Completion))
    async def completions(request: Request) -> Response:
        return await CompletionServing(_ctx(request)).handle(request)

    @api.post(
        "/audio/transcriptions",
        openapi_extra=_form_body(translation=False),
        responses=_audio_answers(),
    )
    async def transcriptions(request: Request) -> Response:
        return await TranscriptionServing(_ctx(request)).handle(request)

    @api.post("/audio/translations", openapi_extra=_form_body(translation=True), responses=_audio_answers())
    async def translations(request: Request) -> Response:
        return await TranslationServing(_ctx(request)).handle(request)

    @api.post("/audio/speech", openapi_extra=_json_body(SpeechRequest), responses=speech_answers(_ERRORS))
    async def speech(request: Request) -> Response:
        return await SpeechServing(_ctx(request), request.app.state.speech).handle(request)

    @api.get("/audio/voices", responses={200: {"model": VoiceList}, **_ERRORS})
    async def voices(request: Request) -> dict:
        return await SpeechServing(_ctx(request), request.app.state.speech).voices()

    @api.post(
        "/responses",
        openapi_extra=_json_body(ResponsesRequest),
        responses=_generated(ResponseObject, ResponseStreamEvent),
    )
    async def responses(request: Request) -> Response:
        return await ResponsesServing(_ctx(request), store).handle(request)

    @api.get("/responses/{response_id}", responses={200: {"model": ResponseObject}, **_ERRORS})
    async def get_response(response_id: str, request: Request) -> dict:
        return await ResponsesServing(_ctx(request), store).retrieve(response_id)

    @api.delete("/responses/{response_id}", responses={200: {"model": ResponseDeleted}, **_ERRORS})
    async def delete_response(response_id: str, request: Request) -> dict:
        return await ResponsesServing(_ctx(request), store).delete(response_id)

    @api.get("/responses/{response_id}/input_items", responses={200: {"model": InputItemList}, **_ERRORS})
    async def response_input_items(
        response_id: str,
        request: Request,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict:
        serving = ResponsesServing(_ctx(request), store)
        return await serving.input_items(response_id, after=after, limit=limit, order=order)

    router.include_router(api)
    return router


def _form_body(*, translation: bool) -> dict[str, Any]:
    """The multipart form the audio endpoints read by hand (``TranscriptionRequest.from_form``)."""
    properties: dict[str, Any] = {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "The audio: flac, mp3, mp4, m4a, ogg, wav, webm.",
        },
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": ["json", "text", "srt", "verbose_json", "vtt"]},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "stream": {"type": "boolean"},
    }
    if not translation:
        properties["language"] = {"type": "string"}
        properties["timestamp_granularities[]"] = {"type": "array", "items": {"enum": ["segment"]}}
    schema = {"type": "object", "required": ["file", "model"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _audio_answers() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "json / verbose_json (application/json), text / srt / vtt (text), or SSE when stream",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            _inline_refs(Transcription.model_json_schema()),
                            _inline_refs(TranscriptionVerbose.model_json_schema()),
                        ]
                    }
                },
                "text/plain": {"schema": {"type": "string"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
        **_ERRORS,
    }
