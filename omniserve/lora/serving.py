"""LoRA in the gateway: the adapters configured at start-up, and the run-time load/unload endpoints.

``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
``{"lora_name"}`` take vLLM's bodies and answer as vLLM does (200 with a line of text), so tools
written for vLLM (the inference gateway's LoRA syncer) drive omniserve unchanged. They are refused
(403) unless the server runs with ``--allow-runtime-lora``, and read only folders under
``--lora-root`` (symlinks resolved, so a link cannot lead out). With ``--lora-admin-key`` they need that
key; otherwise the API keys, as every ``/v1`` route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from omniserve.errors import AuthenticationFailed, ModelLoadError, OmniServeError
from omniserve.protocol import ErrorResponse
from omniserve.server.errors import parse_body

if TYPE_CHECKING:
    from omniserve.config import EngineConfig, ServerConfig
    from omniserve.engines.base import Engine
    from omniserve.lora.registry import LoraRegistry
    from omniserve.server.auth import ApiKeyAuth


class LoraForbidden(OmniServeError):
    """Run-time loading is off, or the path lies outside ``--lora-root``."""

    status_code = 403
    error_type = "permission_error"
    default_code = "lora_forbidden"


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``/v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body for ``/v1/unload_lora_adapter`` (``lora_int_id`` accepted and unused: names are unique)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def serves_lora(server: ServerConfig) -> bool:
    """Whether this server may serve adapters at all (else no registry is built: nothing to check against)."""
    return bool(server.lora or server.lora_file or server.allow_runtime_lora)


def configured_adapters(server: ServerConfig) -> dict[str, Path]:
    """``--lora`` and ``--lora-file`` together (the flag wins a name given twice); ``ModelLoadError`` for a bad file.

    The file holds ``NAME=PATH`` lines (blank lines and ``#`` comments ignored), or YAML/JSON: a mapping
    of names to paths, or a list of ``{name, path}``. Relative paths are relative to the file's folder.
    """
    found: dict[str, Path] = {}
    if server.lora_file is not None:
        found.update(_read_lora_file(server.lora_file))
    found.update({name: Path(path).expanduser() for name, path in server.lora.items()})
    return found


def _read_lora_file(file: Path) -> dict[str, Path]:
    import yaml

    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--lora-file {file}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    pairs: list[tuple[Any, Any]] = []
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if lines and all("=" in line and not line.startswith(("-", "{", "[")) for line in lines):
        pairs = [tuple(part.strip() for part in line.split("=", 1)) for line in lines]
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ModelLoadError(f"--lora-file {file}: neither NAME=PATH lines nor YAML/JSON: {exc}") from None
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list) and all(isinstance(item, dict) for item in data):
            pairs = [(item.get("name"), item.get("path")) for item in data]
        elif data is not None:
            raise ModelLoadError(
                f"--lora-file {file}: expected NAME=PATH lines, a mapping, or a list of {{name, path}}"
            )
    bad = [pair for pair in pairs if not (isinstance(pair[0], str) and pair[0] and isinstance(pair[1], str | Path))]
    if bad:
        raise ModelLoadError(f"--lora-file {file}: entry {json.dumps([str(v) for v in bad[0]])} lacks a name or path")
    return {name: (file.parent / Path(path).expanduser()) for name, path in pairs}


async def start_loras(engine: Engine, engine_config: EngineConfig, server: ServerConfig) -> LoraRegistry | None:
    """The registry with the configured adapters registered (``ModelLoadError`` if one cannot be served)."""
    if not serves_lora(server):
        return None
    from omniserve.lora.adapter import LoraBase
    from omniserve.lora.registry import LoraRegistry

    adapters = configured_adapters(server)
    base = await asyncio.to_thread(
        LoraBase.from_checkpoint, engine_config.model, max_lora_rank=engine_config.max_lora_rank
    )
    registry = LoraRegistry(engine, base, base_name=engine_config.served_model_name, max_loras=engine_config.max_loras)
    await registry.start(adapters)
    return registry


def under_root(lora_path: str, root: Path) -> Path:
    """``lora_path`` (absolute, or relative to ``root``) resolved; ``LoraForbidden`` when it leads out of ``root``."""
    path = (root / Path(lora_path).expanduser()).resolve()
    if not path.is_relative_to(root):
        raise LoraForbidden(
            f"lora_path {lora_path!r} is outside the folder run-time adapters are read from (--lora-root)",
            param="lora_path",
        )
    return path


def _documented(body: type[BaseModel]) -> dict[str, Any]:
    """What ``/openapi.json`` says of an endpoint whose body is parsed by hand (``parse_body``: OpenAI's errors)."""
    schema = body.model_json_schema()
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        "responses": {
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Success: ..."},
            "default": {"model": ErrorResponse, "description": "OpenAI's error object"},
        },
    }


def build_lora_router(server: ServerConfig, auth: ApiKeyAuth) -> APIRouter:
    """The two run-time endpoints; refused (403) unless ``--allow-runtime-lora``."""
    router = APIRouter(prefix="/v1")
    admin_key = server.lora_admin_key.encode() if server.lora_admin_key else None

    async def guard(request: Request) -> LoraRegistry:
        if admin_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key):
                raise AuthenticationFailed("loading and unloading LoRA adapters needs the admin key (--lora-admin-key)")
        else:
            await auth(request)
        if not server.allow_runtime_lora:
            raise LoraForbidden("run-time LoRA loading is off: start the server with --allow-runtime-lora")
        registry = getattr(getattr(request.app.state, "ctx", None), "loras", None)
        if registry is None:  # still starting
            from omniserve.errors import EngineUnavailable

            raise EngineUnavailable("the server is still starting")
        return registry

    @router.post("/load_lora_adapter", **_documented(LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        registry = await guard(request)
        body = parse_body(LoadLoraAdapterRequest, await request.body())
        assert server.lora_root is not None  # the config refuses --allow-runtime-lora without it
        path = under_root(body.lora_path, server.lora_root)
        await registry.add(body.lora_name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/unload_lora_adapter", **_documented(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        registry = await guard(request)
        body = parse_body(UnloadLoraAdapterRequest, await request.body())
        await registry.remove(body.lora_name)
        metrics = getattr(request.app.state.ctx, "metrics", None)
        if metrics is not None:
            metrics.forget_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return router
