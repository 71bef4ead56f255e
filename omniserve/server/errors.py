"""Every failure becomes OpenAI's error object here, in one place.

Lower layers raise typed errors (``omniserve.errors``); this module turns those, pydantic's
validation errors and Starlette's HTTP errors into ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from omniserve.errors import InvalidRequest, OmniServeError, QueueFull

log = logging.getLogger(__name__)

# Discriminator tags pydantic puts in error locations; they are not part of the request's path.
_UNION_TAGS = {"system", "developer", "user", "assistant", "text", "image_url", "video_url", "input_audio", "audio_url"}
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def error_response(exc: OmniServeError, *, retry_after: int = 1) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if isinstance(exc, QueueFull) else None
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    previous_was_index = False
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
            previous_was_index = True
            continue
        text = str(item)
        next_is_field = i + 1 < len(loc)
        if "[" in text or "(" in text or text.lower() in _TYPE_NAMES:
            continue
        if (previous_was_index or i == 0) and text in _UNION_TAGS and next_is_field and loc[i + 1] == text:
            previous_was_index = False
            continue  # e.g. content[1].image_url.image_url: the first is the union tag
        if previous_was_index and text in _UNION_TAGS and next_is_field:
            previous_was_index = False
            continue
        parts.append(("." if parts else "") + text)
        previous_was_index = False
    return "".join(parts) or None


def from_validation_error(errors: list[Any]) -> InvalidRequest:
    """The first error, phrased for a client, with the request path it concerns."""
    if not errors:
        return InvalidRequest("invalid request")
    # a union yields one error per member; the deepest location names the real problem
    first = max(errors, key=lambda e: len(tuple(e.get("loc", ()))))
    loc = tuple(first.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = _param(loc)
    if first.get("type") == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param}", param=param, code="unrecognized_argument"
        )
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "field required"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a request body, turning every failure into a 400 that says what is wrong."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc.errors()) from None


def install_error_handlers(app: FastAPI, *, retry_after: int) -> None:
    @app.exception_handler(OmniServeError)
    async def _omni(_: Request, exc: OmniServeError) -> JSONResponse:
        return error_response(exc, retry_after=retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = OmniServeError(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        error.status_code = exc.status_code
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = OmniServeError(f"internal error: {type(exc).__name__}", code="internal_error")
        error.status_code, error.error_type = 500, "server_error"
        return error_response(error)
