"""Operational behaviour: auth, bounded queue (429 + Retry-After), disconnects freeing slots,
/health staying responsive during generation, /metrics moving, and other checkpoint families."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, idle, start_server, wait_until
from tests.media_factory import png_bytes, video_bytes

KEY = "s3cret-key"
LONG = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def small_server(tiny_qwen2: Path) -> Iterator[RunningServer]:
    """A text-only Qwen2 with auth, one batch slot and a one-request queue."""
    srv = start_server(
        tiny_qwen2,
        name="tiny-qwen2",
        engine={"max_concurrency": 1, "max_queue": 1, "max_n": 1},
        server={"api_keys": (KEY, "other-key"), "retry_after_seconds": 3, "max_request_bytes": 64 * 1024},
    )
    yield srv
    srv.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hello"}], **extra}


def test_auth(small_server: RunningServer) -> None:
    url = small_server.base_url + "/v1/chat/completions"
    for headers in ({}, auth("wrong"), {"Authorization": "Basic abc"}):
        resp = httpx.post(url, json=body(max_tokens=2), headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(small_server.base_url + "/v1/models").status_code == 401
    assert httpx.post(url, json=body(max_tokens=2), headers=auth("other-key")).status_code == 200
    assert httpx.get(small_server.base_url + "/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        small_server.client("nope").models.list()
    out = small_server.client(KEY).chat.completions.create(
        model="tiny-qwen2", messages=body()["messages"], max_tokens=3
    )
    assert out.choices[0].message.content is not None


def test_request_body_over_the_cap_is_413(small_server: RunningServer) -> None:
    big = body(messages=[{"role": "user", "content": "x" * 100_000}])
    resp = httpx.post(small_server.base_url + "/v1/chat/completions", json=big, headers=auth())
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is counted
        yield b'{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}]}'

    resp = httpx.post(
        small_server.base_url + "/v1/chat/completions",
        content=chunks(),
        headers={**auth(), "content-type": "application/json"},
    )
    assert resp.status_code == 413
    assert httpx.get(small_server.base_url + "/health").status_code == 200


def test_text_only_model_refuses_media(small_server: RunningServer) -> None:
    part = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()},
    }
    resp = httpx.post(
        small_server.base_url + "/v1/chat/completions",
        headers=auth(),
        json=body(messages=[{"role": "user", "content": [part]}]),
    )
    assert resp.status_code == 400
    assert "does not accept image" in resp.json()["error"]["message"]


@contextmanager
def slot_held(srv: RunningServer) -> Iterator[None]:
    """A streaming request holds the server's one batch slot (it has its first line) until the block ends: then
    its client leaves and the holder's thread is joined."""
    wait_until(lambda: idle(srv))
    started, stop = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_slot, args=(srv, started, stop))
    holder.start()
    try:
        assert started.wait(30)
        yield
    finally:
        stop.set()
        holder.join(30)


def _hold_slot(srv: RunningServer, started: threading.Event, stop: threading.Event) -> None:
    with httpx.stream(
        "POST", srv.base_url + "/v1/chat/completions", headers=auth(), timeout=60, json=body(stream=True, **LONG)
    ) as resp:
        assert resp.status_code == 200
        for _ in resp.iter_lines():
            started.set()
            if stop.is_set():
                break  # leaving the block closes the connection: a client disconnect


def test_queue_full_gives_429_and_disconnect_frees_slot(small_server: RunningServer) -> None:
    queued_result: dict[str, int] = {}

    def queued() -> None:
        resp = httpx.post(
            small_server.base_url + "/v1/chat/completions", headers=auth(), timeout=120, json=body(max_tokens=2)
        )
        queued_result["status"] = resp.status_code

    waiter = threading.Thread(target=queued)
    with slot_held(small_server):
        # a sequence counts as waiting until its first token, then as running: the holder is in the batch
        wait_until(lambda: small_server.engine.stats().running == 1)
        waiter.start()
        wait_until(lambda: small_server.engine.stats().waiting == 1)
        # one sequence running, one waiting (--max-queue 1 counts sequences): the next is refused at once
        resp = httpx.post(small_server.base_url + "/v1/chat/completions", headers=auth(), json=body(max_tokens=2))
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "3"
        assert resp.json()["error"]["type"] == "rate_limit_error"
        # streaming requests are refused the same way (before the stream starts)
        resp = httpx.post(small_server.base_url + "/v1/chat/completions", headers=auth(), json=body(stream=True))
        assert resp.status_code == 429
    # the streaming client has gone away: its slot is freed and the queued request runs
    waiter.join(60)
    assert queued_result["status"] == 200
    wait_until(lambda: idle(small_server))


def test_client_leaving_the_queue_frees_its_place(small_server: RunningServer) -> None:
    with slot_held(small_server):
        with pytest.raises(httpx.ReadTimeout):  # queued behind the holder, then gives up
            httpx.post(
                small_server.base_url + "/v1/chat/completions", headers=auth(), timeout=1.0, json=body(max_tokens=2)
            )
        wait_until(lambda: small_server.engine.stats().waiting == 0, timeout=10)
        assert small_server.engine.stats().running == 1  # the holder is still generating


def test_non_streaming_disconnect_frees_slot(small_server: RunningServer) -> None:
    wait_until(lambda: idle(small_server))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.base_url + "/v1/chat/completions", headers=auth(), timeout=1.0, json=body(**LONG))
    wait_until(lambda: idle(small_server), timeout=10)


def test_health_and_metrics_stay_responsive_during_generation(small_server: RunningServer) -> None:
    with slot_held(small_server):
        for path in ("/health", "/metrics"):
            t0 = time.perf_counter()
            assert httpx.get(small_server.base_url + path, timeout=5).status_code == 200
            assert time.perf_counter() - t0 < 1.0
        wait_until(lambda: small_server.engine.stats().running == 1)
        metrics = _metrics(small_server)
        assert metrics["omniserve_running_requests"] == 1  # sequences, as the engine's stats count them
        assert metrics["omniserve_queue_depth"] == 0
        # what inference-gateway pickers route on: the running sequence's tokens in the cache
        assert 0 < metrics["omniserve_kv_cache_usage_perc"] < 1
    wait_until(lambda: idle(small_server), timeout=30)
    assert _metrics(small_server)["omniserve_kv_cache_usage_perc"] == 0


def _metrics(srv: RunningServer) -> dict[str, float]:
    text = httpx.get(srv.base_url + "/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels.get("endpoint") and sample.labels.get("status"):
                key += f"{{{sample.labels['endpoint']},{sample.labels['status']}}}"
            values[key] = values.get(key, 0.0) + sample.value
    return values


def test_metrics_counters_move(small_server: RunningServer) -> None:
    before = _metrics(small_server)
    httpx.post(
        small_server.base_url + "/v1/chat/completions",
        headers=auth(),
        json=body(max_tokens=4, temperature=0, ignore_eos=True),
        timeout=60,
    )
    httpx.post(small_server.base_url + "/v1/chat/completions", headers=auth(), json=body(temperature=9))
    after = _metrics(small_server)

    def grew(name: str, by: float = 1) -> bool:
        return after.get(name, 0) - before.get(name, 0) >= by

    assert grew("omniserve_requests_total{/v1/chat/completions,200}")
    assert grew("omniserve_requests_total{/v1/chat/completions,400}")
    assert grew("omniserve_completion_tokens_total", 4)
    assert grew("omniserve_prompt_tokens_total", 2)
    assert grew("omniserve_time_to_first_token_seconds_count")
    assert grew("omniserve_request_latency_seconds_count")
    assert "omniserve_queue_depth" in after


def test_batching_shares_forward_passes(small_server: RunningServer, tiny_qwen2: Path) -> None:
    """Requests arriving together are decoded in the same steps (tokens per step > 1)."""
    srv = start_server(tiny_qwen2, name="tiny-qwen2", engine={"max_concurrency": 4})
    try:
        engine = srv.engine
        before = engine.stats()
        client = srv.client()

        def run(_: int) -> None:
            client.chat.completions.create(
                model="tiny-qwen2",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=40,
                extra_body={"ignore_eos": True},
            )

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = engine.stats()
        tokens = after.decoded_tokens - before.decoded_tokens
        steps = after.decode_steps - before.decode_steps
        assert tokens >= 4 * 39
        assert tokens / steps > 1.5, (tokens, steps)
    finally:
        srv.stop()


def test_qwen2_vl_serves_image_and_video(tiny_qwen2_vl: Path) -> None:
    srv = start_server(tiny_qwen2_vl, name="tiny-vl")
    try:
        image = base64.b64encode(png_bytes(64, 64)).decode()
        clip = base64.b64encode(video_bytes("mp4", 1, 4)).decode()
        out = srv.client().chat.completions.create(
            model="tiny-vl",
            max_tokens=3,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{clip}"}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ],
        )
        assert out.usage.prompt_tokens > 10
        audio = {"type": "input_audio", "input_audio": {"data": image, "format": "wav"}}
        resp = httpx.post(
            srv.base_url + "/v1/chat/completions",
            json={"model": "tiny-vl", "messages": [{"role": "user", "content": [audio]}]},
        )
        assert resp.status_code == 400 and "audio" in resp.json()["error"]["message"]
    finally:
        srv.stop()


def test_incomplete_checkpoint_is_refused_at_start(tiny_qwen2: Path, tmp_path: Path) -> None:
    """A checkpoint missing a weight must not be served with that weight silently random."""
    import shutil

    from safetensors.torch import load_file, save_file

    from omniserve.engines.hf_model import load_model
    from omniserve.errors import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2, broken)
    weights = load_file(broken / "model.safetensors")
    weights.pop("model.layers.0.mlp.up_proj.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(broken)
