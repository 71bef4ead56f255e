"""Admission as every engine does it, on the transformers engine through a real server.

``--max-queue`` and the queue metrics count sequences (choices), not requests, whichever engine
serves: ``max_concurrency`` running plus ``max_queue`` waiting sequences are admitted, the next
request is a 429 before anything runs, and a request whose ``n`` could never fit the batch is a 400
naming ``n`` (not a 429 that retrying can never cure, nor a 500).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, idle, start_server, wait_until

LONG = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_qwen2: Path) -> Iterator[RunningServer]:
    """Two batch slots, one waiting place, and n up to 4 allowed by the gateway (so the engine decides)."""
    srv = start_server(tiny_qwen2, name="tiny-qwen2", engine={"max_concurrency": 2, "max_queue": 1, "max_n": 4})
    yield srv
    srv.stop()


def chat(srv: RunningServer, timeout: float = 60, **extra: Any) -> httpx.Response:
    body = {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **extra}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=timeout)


def gauges(srv: RunningServer) -> dict[str, float]:
    text = httpx.get(srv.base_url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_n_beyond_the_batch_is_a_400_naming_n(server: RunningServer) -> None:
    wait_until(lambda: idle(server))
    for stream in (False, True):  # a streaming request is refused before its stream starts
        resp = chat(server, n=3, stream=stream)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "n" and error["type"] == "invalid_request_error"
        assert "n=3" in error["message"] and "transformers engine" in error["message"]
    assert idle(server)  # nothing was admitted
    assert chat(server, n=2).status_code == 200  # a full batch is fine


def test_the_queue_counts_sequences_and_so_do_the_metrics(server: RunningServer) -> None:
    """Capacity 2 running + 1 waiting sequences: one request with n=2 fills the batch on its own."""
    wait_until(lambda: idle(server))
    started, stop = threading.Event(), threading.Event()

    def hold() -> None:  # one request, two sequences, until told to leave
        body = {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True, **LONG}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for _ in resp.iter_lines():
                started.set()
                if stop.is_set():
                    break  # leaving the block closes the connection: a client disconnect

    holder = threading.Thread(target=hold)
    holder.start()
    queued: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: queued.setdefault("status", chat(server, timeout=120).status_code))
    try:
        assert started.wait(30)
        wait_until(lambda: server.engine.stats().running == 2)
        metrics = gauges(server)
        # one request, two sequences running: the metrics say sequences
        assert (metrics["omniserve_running_requests"], metrics["omniserve_queue_depth"]) == (2, 0)

        # counting requests, this one would queue (no request waits); counting sequences, 2 + 2 > 3
        resp = chat(server, n=2)
        assert resp.status_code == 429 and resp.json()["error"]["type"] == "rate_limit_error"

        waiter.start()  # one sequence takes the one waiting place
        wait_until(lambda: server.engine.stats().waiting == 1)
        assert gauges(server)["omniserve_queue_depth"] == 1
        assert chat(server).status_code == 429  # the third sequence beyond the batch is refused
    finally:
        stop.set()
        holder.join(30)
    waiter.join(60)
    assert queued["status"] == 200  # the holder left: its slots went to the queued request
    wait_until(lambda: idle(server))


def test_a_refused_batch_withdraws_what_it_had_already_queued(server: RunningServer) -> None:
    """Two prompts with n=2 need 4 sequences of an engine that admits 3: the request is a 400 (it
    could never fit; tests/test_request_limits.py), and no prompt of it may decode unseen."""
    wait_until(lambda: idle(server))
    before = server.engine.stats().decode_steps
    body = {"model": "tiny-qwen2", "prompt": ["a", "b"], "n": 2, "max_tokens": 200, "ignore_eos": True}
    resp = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", resp.text
    wait_until(lambda: idle(server))
    time.sleep(1.0)  # long enough for ~200 decode steps had the first prompt run
    assert server.engine.stats().decode_steps - before < 5
