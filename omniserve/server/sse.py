"""Server-sent events framing for OpenAI streams."""

from __future__ import annotations

import json
from typing import Any

from omniserve.errors import OmniServeError

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(exc: OmniServeError) -> str:
    """A failure after the stream started: an error event the openai client raises on, then [DONE]."""
    return sse_event(exc.to_dict())
