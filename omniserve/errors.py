"""Error types, each carrying what the HTTP layer needs to answer in OpenAI's error shape.

The server maps these to responses in one place (``server/errors.py``); lower layers raise them
without knowing about HTTP, so a media decoder or an engine never builds a response itself.
"""

from __future__ import annotations


class OmniServeError(Exception):
    """Base of every error the gateway turns into ``{"error": {...}}``."""

    status_code: int = 400
    error_type: str = "invalid_request_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_dict(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(OmniServeError):
    """The request is well-formed JSON but asks for something invalid."""

    default_code = "invalid_request"


class UnsupportedParameter(InvalidRequest):
    """A field OpenAI defines that this server or engine does not implement: refused, never ignored."""

    default_code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class MediaError(InvalidRequest):
    """Media that cannot be fetched or decoded, or is not what it claims to be."""

    default_code = "invalid_media"


class MediaTooLarge(MediaError):
    """Media over a configured cap (bytes, pixels, frames, seconds)."""

    default_code = "media_too_large"


class MediaFetchForbidden(MediaError):
    """A media URL that the safety policy refuses (scheme, address or domain)."""

    default_code = "media_url_forbidden"


class UnsupportedMediaEncoding(MediaError):
    """A media server answered with a compressed body (``Content-Encoding`` other than identity).

    Refused rather than inflated: a few hundred bytes of nested gzip can inflate to gigabytes in one
    decoder call, before any byte cap sees them.
    """

    default_code = "unsupported_media_encoding"


class RequestTooLarge(OmniServeError):
    status_code = 413
    default_code = "request_too_large"


class AuthenticationFailed(OmniServeError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFound(OmniServeError):
    status_code = 404
    default_code = "model_not_found"


class QueueFull(OmniServeError):
    """The bounded wait queue is full; the HTTP layer adds the configured Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class EngineUnavailable(OmniServeError):
    """The engine is not (yet, or no longer) able to generate."""

    status_code = 503
    error_type = "server_error"
    default_code = "engine_unavailable"


class EngineError(OmniServeError):
    """A failure inside the engine while generating; the request fails, the server keeps serving."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"


class ModelLoadError(Exception):
    """A checkpoint that cannot be loaded; raised at start-up, reported by the CLI, never over HTTP."""


class TooManyMediaItems(MediaError):
    """More parts of one media kind than a request may carry; decided before anything is fetched."""

    default_code = "too_many_media_items"


class MediaBudgetExceeded(MediaTooLarge):
    """A request whose media together decode to more than its per-request budget (pixels, audio seconds)."""

    default_code = "media_budget_exceeded"


class MediaDecodeTimeout(MediaTooLarge):
    """One media item took longer to decode than the server allows: too costly, like media over a size cap."""

    default_code = "media_decode_timeout"


class MediaBusy(QueueFull):
    """Decoding capacity (decode slots, decoded-media memory) stayed taken for the whole bounded wait.

    A ``QueueFull`` so the HTTP layer adds ``Retry-After`` as it does for a full engine queue; a 503 rather
    than a 429 because the server is out of capacity, whatever this client's own rate.
    """

    status_code = 503
    error_type = "server_error"
    default_code = "media_busy"
