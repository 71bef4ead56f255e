"""An engine that "writes" given replies: for tests of what the gateway does with a model's text.

A model that calls tools or thinks in ``<think>`` blocks is not available offline, and the random tiny
models never write either; so only the engine's ``stream`` hook is replaced, by one yielding the reply a
few characters at a time as an engine would. Everything else is real: the HTTP server, parsing,
validation, the template rendering, admission, the parsers, SSE and the openai client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from omniserve.engines.base import ChoiceDelta, GenerationRequest
from tests.conftest import RunningServer

Script = Callable[..., list[GenerationRequest]]


def scripted_engine(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Script:
    """``script(*replies, piece=4)`` makes choice i answer ``replies[i % len]``; returns the requests seen."""
    seen: list[GenerationRequest] = []

    def script(*replies: str, piece: int = 4) -> list[GenerationRequest]:
        async def stream(request: GenerationRequest, native: Any) -> AsyncIterator[ChoiceDelta]:
            seen.append(request)
            for index in range(request.sampling.n):
                text = replies[index % len(replies)]
                for start in range(0, len(text), piece):
                    yield ChoiceDelta(index=index, text=text[start : start + piece], token_ids=[1])
                yield ChoiceDelta(index=index, finish_reason="stop")

        monkeypatch.setattr(server.engine, "stream", stream)
        return seen

    return script
