"""Limits on one request, through a real server: admission is all or nothing, and a refusal is a 400
(or a 429) that leaves the keep-alive connection usable.

- A batch of prompts is admitted whole or not at all: a refused batch leaves nothing queued or
  running, and the engine decodes nothing for it (issue 12, item 3).
- A batch that could never fit the engine's places is a 400, not a 429 retried forever.
- Deeply nested JSON, a ``seed`` outside 64 bits, ``n`` above the batch, over-long stop strings and
  ``stop_token_ids`` outside the vocabulary (with ``min_tokens`` it reached the sampler's index) are
  400s with OpenAI's error object; the connection that carried them serves the next request (a 500
  made uvicorn close it, and the client's next request on it failed) (issue 12, item 6).
- A bug in a handler is OpenAI's 500, and the connection serves the next request too.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omniserve.config import EngineConfig
from omniserve.engines.base import ChoiceDelta, Engine, GenerationRequest, ModelInfo
from omniserve.errors import EngineUnavailable
from omniserve.models.tokenizer import TINY_VOCAB_SIZE
from omniserve.protocol import MAX_SEED, MAX_STOP_CHARS, MIN_SEED
from omniserve.sampling import SamplingParams
from omniserve.templates.render import RenderedPrompt
from tests.conftest import RunningServer, idle, start_server, wait_until

MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def server(tiny_qwen2: Path) -> Iterator[RunningServer]:
    """Three batch slots and one waiting place (4 sequences in all); the gateway allows n up to 4."""
    srv = start_server(tiny_qwen2, name=MODEL, engine={"max_concurrency": 3, "max_queue": 1, "max_n": 4})
    yield srv
    srv.stop()


def quiet(srv: RunningServer, timeout: float = 20.0) -> None:
    """Idle, and the worker done with its step in flight (a client that left frees its places at once;
    its sequence leaves the batch at the worker's next step)."""
    wait_until(lambda: idle(srv), timeout)
    steps = -1
    while steps != srv.engine.stats().decode_steps:
        steps = srv.engine.stats().decode_steps
        time.sleep(0.2)


def queue_gauges(srv: RunningServer) -> tuple[float, float]:
    """(running, waiting) sequences as ``/metrics`` reports them."""
    text = httpx.get(srv.base_url + "/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["omniserve_running_requests"], values["omniserve_queue_depth"]


def completion(srv: RunningServer, prompts: list[str], **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 400, "ignore_eos": True, **extra}
    return httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60)


class Holder:
    """A streaming chat request with ``n`` choices that decodes until told to leave (a client disconnect)."""

    def __init__(self, srv: RunningServer, n: int) -> None:
        self._srv, self._n = srv, n
        self.started, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Holder:
        self._thread.start()
        assert self.started.wait(30)
        wait_until(lambda: self._srv.engine.stats().running == self._n)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hold"}],
            "n": self._n,
            "stream": True,
            "max_tokens": 5000,
            "ignore_eos": True,
        }
        with httpx.stream("POST", self._srv.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
            for _ in resp.iter_lines():
                self.started.set()
                if self._stop.is_set():
                    break  # leaving the block closes the connection: the client is gone


def test_a_batch_refused_under_load_starts_nothing(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sequences run; three one-sequence prompts need 3 of the 2 free places: 429, and none of
    them may start. Admitted one by one, the first two were handed to the engine (the first took a
    free batch slot and could decode) before the third was refused; now none is, and every decode
    step holds exactly the holder's two sequences."""
    wait_until(lambda: idle(server))
    with Holder(server, n=2):
        assert queue_gauges(server) == (2, 0)
        handed: list[str] = []
        real_stream = server.engine.stream

        def spy(request: Any, native: Any) -> Any:
            handed.append(request.request_id)
            return real_stream(request, native)

        monkeypatch.setattr(server.engine, "stream", spy)
        before = server.engine.stats()
        resp = completion(server, ["a", "b", "c"])
        assert resp.status_code == 429, resp.text
        assert handed == []  # no prompt of the refused batch reached the engine
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert queue_gauges(server) == (2, 0)  # at once: nothing of the batch is queued or running
        time.sleep(0.5)
        after = server.engine.stats()
        assert (after.running, after.waiting) == (2, 0)
        steps = after.decode_steps - before.decode_steps
        assert steps > 0  # the holder kept decoding meanwhile
        assert after.decoded_tokens - before.decoded_tokens == 2 * steps  # and only the holder
    wait_until(lambda: idle(server))


def test_a_batch_that_can_never_fit_is_a_400_and_starts_nothing(server: RunningServer) -> None:
    """Three prompts with n=2 need 6 sequences of an engine that admits 4: retrying cannot help."""
    quiet(server)
    before = server.engine.stats()
    for stream in (False, True):
        resp = completion(server, ["a", "b", "c"], n=2, stream=stream)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "prompt" and error["type"] == "invalid_request_error"
        assert "6 sequences" in error["message"] and "4" in error["message"]
        assert queue_gauges(server) == (0, 0)
    time.sleep(0.3)
    after = server.engine.stats()
    assert (after.decode_steps, after.decoded_tokens) == (before.decode_steps, before.decoded_tokens)
    ok = completion(server, ["a", "b"], n=2, max_tokens=3)  # 4 sequences fit: all of them run
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("after", [0.0, 0.3])
def test_nothing_runs_after_the_client_left(server: RunningServer, stream: bool, after: float) -> None:
    """However a request ends, its work ends with it: here the client of a batch of prompts leaves
    before the answer starts (0 s) or while it is generated (0.3 s)."""
    quiet(server)
    body = json.dumps(
        {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 8000, "ignore_eos": True, "stream": stream}
    ).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        sock.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(after)
    quiet(server, timeout=3.0)  # 2 x 8,000 tokens would take far longer
    tokens = server.engine.stats().decoded_tokens
    time.sleep(0.5)
    assert server.engine.stats().decoded_tokens == tokens
    assert queue_gauges(server) == (0, 0)


def _deep(depth: int) -> bytes:
    return b'{"model": "tiny-qwen2", "prompt": "x", "stop": ' + b"[" * depth + b"]" * depth + b"}"


BAD: list[tuple[str, bytes | dict[str, Any], str | None, str]] = [
    ("nested JSON past the recursion limit", _deep(100_000), None, "nested too deeply"),
    ("nested JSON just past the recursion limit", _deep(2_000), None, "nested too deeply"),
    ("lone surrogate", b'{"model": "tiny-qwen2", "prompt": ["ok", "\\udc00"]}', "prompt[1]", "surrogate"),
    ("seed of 2**64", {"seed": 2**64}, "seed", str(MAX_SEED)),
    ("seed just above int64", {"seed": MAX_SEED + 1}, "seed", str(MAX_SEED)),
    ("seed below int64", {"seed": MIN_SEED - 1}, "seed", str(MIN_SEED)),
    ("n above the batch", {"n": 4}, "n", "n=4"),
    ("stop string too long", {"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop", str(MAX_STOP_CHARS)),
    ("too many stop strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("stop token id outside the vocabulary", {"stop_token_ids": [5, 10**9]}, "stop_token_ids", "vocabulary"),
    (
        "stop token id outside the vocabulary with min_tokens",
        {"stop_token_ids": [TINY_VOCAB_SIZE], "min_tokens": 1},
        "stop_token_ids",
        str(TINY_VOCAB_SIZE),
    ),
]


@pytest.mark.parametrize(("name", "bad", "param", "contains"), BAD, ids=[b[0] for b in BAD])
def test_a_refusal_is_a_400_and_keeps_the_connection(
    server: RunningServer, name: str, bad: bytes | dict[str, Any], param: str | None, contains: str
) -> None:
    good = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        if isinstance(bad, bytes):
            refused = http.post("/v1/completions", content=bad, headers={"content-type": "application/json"})
        else:
            refused = http.post("/v1/completions", json={**good, **bad})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and contains in error["message"], error
        assert refused.headers.get("connection", "").lower() != "close"
        served = http.post("/v1/completions", json=good)
        assert served.status_code == 200, served.text
        assert _local_address(served) == _local_address(refused)  # the same connection carried both
    assert idle(server)


def test_seeds_at_the_limits_are_served(server: RunningServer) -> None:
    """The whole int64 range works, also for the choices seeded ``seed + i`` above it."""
    for seed in (MAX_SEED, MIN_SEED, -1, 0):
        resp = completion(server, ["hello"], seed=seed, n=3, max_tokens=3, temperature=1.0)
        assert resp.status_code == 200, resp.text
    same = [completion(server, ["hello"], seed=MAX_SEED, max_tokens=5).json()["choices"][0]["text"] for _ in "ab"]
    assert same[0] == same[1]


def test_a_stop_string_at_the_length_limit_is_accepted(server: RunningServer) -> None:
    resp = completion(server, ["hello"], stop=["x" * MAX_STOP_CHARS, "y"], max_tokens=5)
    assert resp.status_code == 200, resp.text


def test_the_last_stop_token_id_of_the_vocabulary_is_accepted(server: RunningServer) -> None:
    """The bound is the vocabulary: its last id is a stop token like any other, with or without min_tokens."""
    for extra in ({}, {"min_tokens": 2}):
        resp = completion(server, ["hello"], stop_token_ids=[TINY_VOCAB_SIZE - 1], max_tokens=3, **extra)
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unexpected_fault_is_a_500_and_keeps_the_connection(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A bug in a handler (simulated: the renderer's length check raises once) is OpenAI's 500, logged with
    its traceback; Starlette re-raised it after answering, so uvicorn closed the connection under the client."""
    renderer = server.app.state.ctx.renderer
    real, calls = renderer.check_length, {"n": 0}

    def broken_once(*args: Any, **kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(renderer, "check_length", broken_once)
    if path == "/v1/completions":
        good: dict[str, Any] = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    else:
        good = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        failed = http.post(path, json=good)
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_error" and error["code"] == "internal_error", error
        assert "RuntimeError" in error["message"] and "simulated bug" not in error["message"]  # no internals leak
        served = http.post(path, json=good)
        assert served.status_code == 200, served.text
        assert _local_address(served) == _local_address(failed)  # the same connection carried both
    logged = [r for r in caplog.records if r.name == "omniserve.server.errors" and r.exc_info]
    assert logged and "simulated bug" in str(logged[0].exc_info[1])  # the traceback is in the server's log
    assert idle(server)


def _local_address(resp: httpx.Response) -> Any:
    return resp.extensions["network_stream"].get_extra_info("client_addr")


def test_a_batch_the_engine_stops_taking_part_way_is_withdrawn() -> None:
    """The engine refuses the second prompt after taking the first (it began shutting down): the
    first is withdrawn from the engine and every place of the batch is given back."""

    class Queued:
        """Like the transformers engine's relay: the work is queued when the stream is made."""

        def __init__(self, log: list[str], name: str) -> None:
            self._log, self._name = log, name
            log.append(f"queued {name}")

        def __aiter__(self) -> Queued:
            return self

        async def __anext__(self) -> ChoiceDelta:
            raise StopAsyncIteration

        async def aclose(self) -> None:
            self._log.append(f"withdrawn {self._name}")

    class Stopping(Engine[None]):
        NAME = "stopping"

        def __init__(self) -> None:
            super().__init__(EngineConfig(model=Path("fake"), served_model_name="fake", max_concurrency=4))
            self.log: list[str] = []

        async def launch(self) -> ModelInfo:
            return self.served(64, [])

        def shutdown(self) -> None:
            pass

        def prepare(self, request: GenerationRequest) -> None:
            return None

        def stream(self, request: GenerationRequest, native: None) -> AsyncIterator[ChoiceDelta]:
            if self.log:
                raise EngineUnavailable("shutting down")
            return Queued(self.log, request.request_id)

    def job(name: str) -> GenerationRequest:
        params = SamplingParams(max_tokens=2, n=2)
        return GenerationRequest(request_id=name, prompt=RenderedPrompt(token_ids=[1]), sampling=params)

    async def scenario() -> None:
        engine = Stopping()
        await engine.start()
        with pytest.raises(EngineUnavailable):
            engine.generate_all([job("a"), job("b")])
        assert (engine.stats().waiting, engine.stats().running) == (0, 0)  # at once
        await asyncio.sleep(0)  # the withdrawal runs on the loop
        assert engine.log == ["queued a", "withdrawn a"]

    asyncio.run(scenario())
