"""Shutting down and failing without leaving clients hanging (issue 12, items 11 and 7).

Reproduced before the fix, on `omniserve deploy` with a tiny Qwen2: SIGTERM closed the listening socket at
once (a load balancer that had not noticed yet got connection refused), and five seconds later uvicorn cut
a running stream mid-way (the client saw "incomplete chunked read": no error event, no ``[DONE]``); the
process then died of the re-raised signal instead of exiting 0. A transformers worker thread that died
left its streams waiting forever. Prompt rendering ran in the loop's small shared thread pool, behind
media DNS lookups and decodes, and one lock serialised text-only prompts behind slow media prompts.

The shutdown tests run the real command in a subprocess and signal it; the others run a real uvicorn
server in this process. Mocks only simulate faults that cannot be caused for real here: a worker thread
killed by a ``BaseException``, a forward pass that never returns, a DNS server that never answers, a
processor that takes seconds over a large media prompt.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from omniserve.config import MediaLimits
from omniserve.templates.render import PromptRenderer
from tests.conftest import RunningServer, free_port, start_server

CLI = [sys.executable, "-m", "omniserve.cli"]
QWEN2 = "tiny-qwen2"


def chat(model: str = QWEN2, content: Any = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Stream:
    """One streamed chat completion read in a background thread: its ``data:`` payloads as they came."""

    events: list[str] = field(default_factory=list)
    status: int | None = None
    failure: BaseException | None = None
    ended_at: float | None = None
    first_token: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def join(self, timeout: float) -> Stream:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the stream did not end within {timeout} s: {self.events[-3:]}"
        return self

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(event) for event in self.events if event != "[DONE]"]

    def finish_reasons(self) -> list[str]:
        choices = [c["choices"][0] for c in self.chunks if c.get("choices")]
        return [choice["finish_reason"] for choice in choices if choice.get("finish_reason")]


def start_stream(base_url: str, body: dict[str, Any]) -> Stream:
    stream = Stream()

    def read() -> None:
        try:
            url, payload = base_url + "/v1/chat/completions", {**body, "stream": True}
            with httpx.stream("POST", url, json=payload, timeout=120) as resp:
                stream.status = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        stream.events.append(line.removeprefix("data: "))
                        if '"content":"' in line and '"content":""' not in line:
                            stream.first_token.set()
        except BaseException as exc:  # the test asserts on it
            stream.failure = exc
        finally:
            stream.ended_at = time.monotonic()
            stream.first_token.set()

    stream.thread = threading.Thread(target=read, daemon=True)
    stream.thread.start()
    return stream


# --- the real command, signalled ---------------------------------------------------------------------------


@dataclass
class Deployed:
    proc: subprocess.Popen[str]
    base_url: str
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)


def deploy(model: Path, tmp_path: Path, *flags: str) -> Deployed:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "deploy", "--model", str(model), "--port", str(port), "--served-model-name", QWEN2, *flags],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deployed = Deployed(proc, f"http://127.0.0.1:{port}")

    def drain_output() -> None:  # a full pipe would block the server's logging
        assert proc.stdout is not None
        for line in proc.stdout:
            deployed.output.append(line)

    threading.Thread(target=drain_output, daemon=True).start()
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, deployed.text()
        try:
            if httpx.get(deployed.base_url + "/health", timeout=2).status_code == 200:
                return deployed
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.2)


@pytest.fixture
def stop_afterwards() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_drains_then_ends_late_streams_cleanly_and_exits_0(
    tiny_qwen2: Path, tmp_path: Path, stop_afterwards: list[subprocess.Popen[str]]
) -> None:
    delay, timeout = 3.0, 3.0
    server = deploy(tiny_qwen2, tmp_path, "--drain-delay", str(delay), "--drain-timeout", str(timeout))
    stop_afterwards.append(server.proc)
    url = server.base_url
    short = start_stream(url, chat(max_tokens=200, temperature=0, ignore_eos=True))  # ends inside the drain
    late = start_stream(url, chat(max_tokens=7000, temperature=0, ignore_eos=True))  # ~15 s: past the deadline
    plain: dict[str, Any] = {}

    def late_plain() -> None:  # the same, not streamed
        resp = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=7000, ignore_eos=True), timeout=60)
        plain.update(status=resp.status_code, headers=resp.headers, body=resp.json())

    plain_thread = threading.Thread(target=late_plain)
    plain_thread.start()
    assert short.first_token.wait(30) and late.first_token.wait(30)
    deadline = time.monotonic() + 10
    while "omniserve_running_requests 3.0" not in httpx.get(url + "/metrics", timeout=5).text:
        assert time.monotonic() < deadline, "the non-streamed request did not start"
        time.sleep(0.05)
    assert short.ended_at is None and late.ended_at is None and not plain

    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal is seen at the server's next tick (0.1 s)
    # During the drain delay the socket still accepts, so a load balancer that has not noticed yet gets an
    # answer it can retry elsewhere, not a refused connection.
    refused = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=5)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"  # keep-alive clients reconnect, through the balancer
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.json()["error"]["type"] == "server_error"
    streamed = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=2, stream=True), timeout=5)
    assert streamed.status_code == 503 and streamed.headers["retry-after"] == "1"
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "server_shutting_down"
    assert httpx.get(url + "/health/live", timeout=5).status_code == 200  # draining is not dying
    assert httpx.get(url + "/v1/models", timeout=5).status_code == 200
    assert time.monotonic() - signalled < delay, "the checks above must run inside the drain delay"

    # After the delay the listening socket closes; running streams go on.
    closed_at = None
    while closed_at is None and time.monotonic() - signalled < delay + timeout:
        try:
            httpx.get(url + "/version", timeout=1)
            time.sleep(0.1)
        except httpx.ConnectError:
            closed_at = time.monotonic() - signalled
    assert closed_at is not None and closed_at >= delay - 0.3, closed_at
    assert late.ended_at is None

    short.join(30)
    assert short.failure is None and short.status == 200
    assert short.events[-1] == "[DONE]" and short.finish_reasons() == ["length"]
    assert short.ended_at is not None and short.ended_at - signalled < delay + timeout

    # The stream still running at the deadline ends with an OpenAI error event, then [DONE].
    late.join(30)
    assert late.failure is None and late.status == 200, late.failure
    assert late.events[-1] == "[DONE]"
    error = json.loads(late.events[-2])["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error", error
    assert "--drain-timeout" in error["message"]
    assert late.ended_at is not None and delay + timeout - 0.5 <= late.ended_at - signalled <= delay + timeout + 3
    plain_thread.join(30)
    assert plain["status"] == 503 and plain["body"]["error"]["code"] == "server_shutting_down", plain
    assert plain["headers"]["retry-after"] == "1"

    server.proc.wait(30)
    exited = time.monotonic() - signalled
    assert server.proc.returncode == 0, server.text()
    assert exited < delay + timeout + 10, exited
    assert "Finished server process" in server.text()


def test_sigint_drains_the_same_way_and_exits_0(
    tiny_qwen2: Path, tmp_path: Path, stop_afterwards: list[subprocess.Popen[str]]
) -> None:
    server = deploy(tiny_qwen2, tmp_path, "--drain-delay", "1.5", "--drain-timeout", "5")
    stop_afterwards.append(server.proc)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 503
    server.proc.wait(30)
    assert server.proc.returncode == 0, server.text()
    assert 1.5 - 0.3 <= time.monotonic() - signalled < 10  # nothing in flight: gone right after the delay


# --- a real server in this process --------------------------------------------------------------------------


@pytest.fixture
def fresh_qwen2(tiny_qwen2: Path) -> Iterator[Callable[..., RunningServer]]:
    """Servers whose engine a test may break: each test gets its own."""
    started: list[RunningServer] = []

    def make(**server: Any) -> RunningServer:
        srv = start_server(tiny_qwen2, name=QWEN2, engine={"max_concurrency": 4}, server=server or None)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


class _WorkerKilled(BaseException):
    """What ends a thread from below ``Exception``: a library calling ``sys.exit``, an interpreter shutdown."""


def test_a_dead_engine_worker_fails_its_requests_and_turns_health_red(
    fresh_qwen2: Callable[..., RunningServer],
) -> None:
    srv = fresh_qwen2()
    engine = srv.engine
    stream = start_stream(srv.base_url, chat(max_tokens=4000, temperature=0, ignore_eos=True))
    assert stream.first_token.wait(30)
    waiting: dict[str, Any] = {}

    def non_streaming() -> None:
        resp = httpx.post(
            srv.base_url + "/v1/chat/completions", json=chat(max_tokens=4000, ignore_eos=True), timeout=60
        )
        waiting["status"], waiting["body"] = resp.status_code, resp.json()

    blocking = threading.Thread(target=non_streaming)
    blocking.start()
    deadline = time.monotonic() + 20
    while engine.stats().running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    def die() -> None:
        raise _WorkerKilled("simulated")

    engine._decode_step = die  # the worker's next forward pass ends its thread

    stream.join(10)
    assert stream.failure is None and stream.events[-1] == "[DONE]"
    error = json.loads(stream.events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_unavailable", error
    blocking.join(10)
    assert not blocking.is_alive()
    assert waiting["status"] == 503 and waiting["body"]["error"]["code"] == "engine_unavailable"

    health = httpx.get(srv.base_url + "/health", timeout=5)
    assert health.status_code == 503
    assert httpx.get(srv.base_url + "/health/live", timeout=5).status_code == 503  # restart me
    refused = httpx.post(srv.base_url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=5)
    assert refused.status_code == 503
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_an_engine_that_stops_making_progress_turns_health_red(fresh_qwen2: Callable[..., RunningServer]) -> None:
    srv = fresh_qwen2(stall_timeout_seconds=1.0)
    engine = srv.engine
    hang, hanging = threading.Event(), threading.Event()
    step = engine._decode_step

    def hung_step() -> None:  # a forward pass that does not return (a wedged kernel, a deadlock)
        hanging.set()
        hang.wait(60)
        step()

    assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
    engine._decode_step = hung_step
    stream = start_stream(srv.base_url, chat(max_tokens=50, temperature=0, ignore_eos=True))
    try:
        assert hanging.wait(30)
        time.sleep(0.2)
        assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200  # a slow step is not a stall
        time.sleep(1.2)
        health = httpx.get(srv.base_url + "/health", timeout=5)
        assert health.status_code == 503
        assert "no progress" in health.json()["error"]["message"]
        assert httpx.get(srv.base_url + "/health/live", timeout=5).status_code == 503
        metrics = httpx.get(srv.base_url + "/metrics", timeout=5).text
        (stalled,) = re.findall(r"^omniserve_engine_stalled_seconds ([0-9.e+]+)$", metrics, re.MULTILINE)
        assert float(stalled) >= 1.0
    finally:
        engine._decode_step = step
        hang.set()
    stream.join(30)
    assert stream.finish_reasons() == ["length"]
    assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200  # progress again: green


# --- text-only requests do not wait for media work ----------------------------------------------------------

# Decode slots out of the way (as on a server sized for media): the hung work below must reach the threads.
MEDIA_LIMITS = MediaLimits(allow_private_media_addresses=True, fetch_timeout_seconds=30, max_concurrent_decodes=16)


def start_media_server(model: Path, loop: str) -> RunningServer:
    """``conftest.start_server`` with the event loop chosen: on asyncio's own loop DNS lookups run in
    Python's threads; uvloop (uvicorn's default where installed) resolves in libuv's."""
    import uvicorn

    from omniserve.config import EngineConfig, ServerConfig
    from omniserve.engines.registry import create_engine
    from omniserve.server.app import build_app

    engine_config = EngineConfig(model=model, served_model_name="tiny-omni")
    port = free_port()
    engine = create_engine("transformers", engine_config)
    app = build_app(engine, engine_config, ServerConfig(port=port, media=MEDIA_LIMITS))
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on", loop=loop))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", server, thread, engine, app, "tiny-omni")


@pytest.fixture
def media_server(tiny_omni: Path) -> Iterator[RunningServer]:
    srv = start_media_server(tiny_omni, "auto")
    yield srv
    srv.stop()


def image_request(url: str) -> dict[str, Any]:
    return chat(
        "tiny-omni",
        [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}],
        max_tokens=2,
    )


def png_data_url() -> str:
    from tests.media_factory import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()


def timed_text_request(srv: RunningServer) -> float:
    started = time.monotonic()
    resp = httpx.post(srv.base_url + "/v1/chat/completions", json=chat("tiny-omni", max_tokens=2), timeout=15)
    assert resp.status_code == 200, resp.text
    return time.monotonic() - started


def send_in_background(srv: RunningServer, bodies: list[dict[str, Any]]) -> list[threading.Thread]:
    threads = [
        threading.Thread(
            target=lambda body=body: httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=90),
            daemon=True,
        )
        for body in bodies
    ]
    for thread in threads:
        thread.start()
    return threads


def wait_for(count: Callable[[], int], at_least: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while count() < at_least:
        assert time.monotonic() < deadline, f"only {count()} {what} started"
        time.sleep(0.05)
    time.sleep(0.5)  # and whatever else those requests were going to queue


# The loop's default pool, which rendering used to share, held min(32, CPUs + 4) threads: 6 on a 2-core
# machine. The tests hang more media work than that, and wait until at least that much of it hangs.
HUNG = 16
OLD_POOL = min(HUNG, (os.cpu_count() or 1) + 4)


def test_text_requests_are_answered_while_media_decodes_hang(
    media_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import omniserve.media.loader as loader

    decode = loader.decode_image
    release = threading.Event()
    hung: list[int] = []

    def hung_decode(*args: Any, **kwargs: Any) -> Any:  # a decoder stuck in a pathological file
        hung.append(1)
        release.wait(60)
        return decode(*args, **kwargs)

    monkeypatch.setattr(loader, "decode_image", hung_decode)
    senders = send_in_background(media_server, [image_request(png_data_url()) for _ in range(HUNG)])
    try:
        wait_for(lambda: len(hung), OLD_POOL, "decodes")
        assert timed_text_request(media_server) < 3.0
        started = time.monotonic()
        assert httpx.get(media_server.base_url + "/health", timeout=5).status_code == 200  # the engine is fine
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        for sender in senders:
            sender.join(60)


def test_text_requests_are_answered_while_media_dns_lookups_hang(
    tiny_omni: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start_media_server(tiny_omni, "asyncio")  # DNS in Python's threads, where the mock can reach it
    resolve = socket.getaddrinfo
    release = threading.Event()
    stuck: list[str] = []

    def dead_dns(host: Any, *args: Any, **kwargs: Any) -> Any:  # a resolver that never answers
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.endswith(".stuck.test"):
            stuck.append(name)
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dead_dns)
    silent = socket.socket()  # and a media server that accepts connections but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    urls = [f"http://media{i}.stuck.test/cat.png" for i in range(HUNG)]
    urls += [f"http://127.0.0.1:{silent.getsockname()[1]}/cat.png"] * 2
    senders = send_in_background(srv, [image_request(url) for url in urls])
    try:
        wait_for(lambda: len(stuck), OLD_POOL, "lookups")
        assert timed_text_request(srv) < 3.0
        started = time.monotonic()
        assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        silent.close()
        for sender in senders:
            sender.join(60)
        srv.stop()


def test_text_prompts_do_not_wait_behind_a_slow_media_prompt(
    media_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    media_kwargs = PromptRenderer._media_kwargs
    rendering = threading.Event()

    def slow_processor(self: PromptRenderer, *args: Any, **kwargs: Any) -> Any:  # the processor over a long video
        rendering.set()
        time.sleep(4)
        return media_kwargs(self, *args, **kwargs)

    monkeypatch.setattr(PromptRenderer, "_media_kwargs", slow_processor)
    senders = send_in_background(media_server, [image_request(png_data_url())])
    try:
        assert rendering.wait(20)
        assert timed_text_request(media_server) < 2.0
    finally:
        for sender in senders:
            sender.join(30)
