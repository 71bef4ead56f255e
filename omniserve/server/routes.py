"""HTTP routes: a few lines each, dispatching to the serving classes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from omniserve import __version__
from omniserve.errors import EngineUnavailable, ModelNotFound
from omniserve.protocol import ModelCard, ModelList, dump
from omniserve.server.auth import ApiKeyAuth
from omniserve.server.errors import error_response
from omniserve.server.metrics import Metrics
from omniserve.server.serving_base import ServingContext
from omniserve.server.serving_chat import ChatServing
from omniserve.server.serving_completions import CompletionServing


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


def build_router(auth: ApiKeyAuth, metrics: Metrics) -> APIRouter:
    router = APIRouter()
    api = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.get("/health")
    async def health(request: Request) -> Response:
        ctx = getattr(request.app.state, "ctx", None)
        if ctx is None or not ctx.engine.is_ready():
            return error_response(EngineUnavailable("the engine is not ready"))
        return JSONResponse({"status": "ok", "model": ctx.model_name})

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    def card(ctx: ServingContext) -> ModelCard:
        return ModelCard(id=ctx.model_name, max_model_len=ctx.engine.model_info.max_model_len)

    @api.get("/models")
    async def list_models(request: Request) -> dict:
        return dump(ModelList(data=[card(_ctx(request))]))

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        ctx = _ctx(request)
        if model_id != ctx.model_name:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return dump(card(ctx))

    @api.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await ChatServing(_ctx(request)).handle(request)

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        return await CompletionServing(_ctx(request)).handle(request)

    router.include_router(api)
    return router
