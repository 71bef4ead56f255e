"""Every failure becomes OpenAI's error object here, in one place.

Lower layers raise typed errors (``omniserve.errors``); this module turns those, pydantic's
validation errors and Starlette's HTTP errors into ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omniserve.errors import InvalidRequest, OmniServeError, QueueFull
from omniserve.server.sse import DONE, sse_error
from omniserve.validation import describe_validation_error

log = logging.getLogger(__name__)


def error_response(exc: OmniServeError, *, retry_after: int = 1) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if isinstance(exc, QueueFull) else None
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


def from_validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The deepest error (``omniserve.validation`` picks and phrases it) as OpenAI's 400, naming its param."""
    if not errors:
        return InvalidRequest("invalid request")
    problem = describe_validation_error(errors)
    if problem.kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {problem.location}",
            param=problem.location,
            code="unrecognized_argument",
        )
    return InvalidRequest(problem.message, param=problem.location)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a request body, turning every failure into a 400 that says what is wrong.

    JSON nested deeper than the interpreter's recursion limit (a few hundred levels; no request
    needs more than ten) makes the parser or the validator raise ``RecursionError``: that is the
    client's error too. Left to the catch-all handler it was a 500, after which uvicorn closes the
    connection, so the client's next request on it failed as well.
    """
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and (where := _lone_surrogate(payload)) is not None:
        problem = "holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair), no Unicode character"
        raise InvalidRequest(
            f"{where}: the text {problem}" if where else f"the request body {problem}", param=where or None
        )
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc.errors()) from None
    except RecursionError:
        raise _too_deep() from None


def _too_deep() -> InvalidRequest:
    return InvalidRequest("the request body is nested too deeply", code="invalid_json")


#: A JSON escape of a UTF-16 surrogate; the parser joins a high and a low one into one character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(payload: Any) -> str | None:
    """Where the first string holding a lone surrogate is (``messages[0].content``), if any.

    JSON lets ``\\ud800`` through, but no tokenizer can encode it: it failed deep in the template
    layer as a 500. Only walked when the raw body has such an escape, so other requests pay nothing.
    A key holding one is reported by the object it is in ("" for the body): the key itself cannot
    be written into a response.
    """
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return path
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and not _encodable(value):
            return path
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def internal_error(exc: BaseException) -> OmniServeError:
    """OpenAI's 500 for a bug: the exception's type only, its message may hold internals."""
    error = OmniServeError(f"internal error: {type(exc).__name__}", code="internal_error")
    error.status_code, error.error_type = 500, "server_error"
    return error


class UnexpectedErrorMiddleware:
    """Answer an unexpected exception with OpenAI's 500 and keep the keep-alive connection.

    Starlette's own catch-all (``ServerErrorMiddleware``) sends the handler's 500 and then re-raises,
    so uvicorn closes the connection and the client's next request on it fails. This middleware sits
    inside it and swallows the exception once a complete answer is sent: the 500 when nothing was
    sent yet, or, for an event stream already under way that the serving layer did not end (it ends
    its own with an error event), an error event and ``[DONE]``. Any other started response cannot be
    completed honestly, so the exception goes on and the connection is closed.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = event_stream = False

        async def tracking(message: Message) -> None:
            nonlocal started, finished, event_stream
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers", []))
                event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if finished:
                return
            if not started:
                response = error_response(internal_error(exc))
                await response(scope, receive, send)
                return
            if not event_stream:
                raise
            tail = sse_error(internal_error(exc)) + DONE
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})


def install_error_handlers(app: FastAPI, *, retry_after: int) -> None:
    """Map every error type to OpenAI's error object; unexpected ones via ``UnexpectedErrorMiddleware``.

    Installed before any other middleware, so that one sits innermost: the request counter and the
    other middleware see the 500 like any answer.
    """
    app.add_middleware(UnexpectedErrorMiddleware)

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
