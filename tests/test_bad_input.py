"""Every bad request gets a 4xx with OpenAI's error object, and the server keeps serving."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest

from omniserve.protocol import MAX_STOP_CHARS, MIN_SEED
from tests.conftest import RunningServer
from tests.media_factory import audio_bytes, png_bytes, png_with_declared_size, video_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(server: RunningServer, body: Any, path: str = "/v1/chat/completions", **kwargs: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(
            server.base_url + path, content=body, headers={"content-type": "application/json"}, timeout=60, **kwargs
        )
    return httpx.post(server.base_url + path, json=body, timeout=60, **kwargs)


def assert_error(resp: httpx.Response, status: int, *, param: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert contains.lower() in error["message"].lower(), error
    return error


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-omni", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


#: JSON nested far beyond the parser's recursion limit.
DEEP = b'{"model": "tiny-omni", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
#: Valid JSON, but ``\ud800`` alone is no Unicode character: no tokenizer can encode it.
LONE_SURROGATE = b'{"model": "tiny-omni", "messages": [{"role": "user", "content": "hi \\ud800"}]}'


CASES: list[tuple[str, Any, int, str | None, str]] = [
    ("malformed json", b'{"model": "tiny-omni", "messages": [', 400, None, "not valid JSON"),
    ("json array", b"[1, 2]", 400, None, "JSON object"),
    ("missing messages", {"model": "tiny-omni"}, 400, "messages", "required"),
    ("empty messages", {"model": "tiny-omni", "messages": []}, 400, "messages", ""),
    (
        "unknown role",
        {"model": "tiny-omni", "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0]",
        "tag",
    ),
    ("null content", chat(None), 400, "messages[0].content", ""),
    ("unknown part type", chat([{"type": "hologram", "hologram": {}}]), 400, "messages[0].content[0]", "hologram"),
    ("unknown field", chat("hi", frobnicate=1), 400, "frobnicate", "Unrecognized request argument"),
    # tools on a template that does not render them: tests/test_tools.py (the tiny Omni's template renders them)
    ("temperature range", chat("hi", temperature=3.5), 400, "temperature", ""),
    ("top_p range", chat("hi", top_p=0), 400, "top_p", ""),
    ("negative max_tokens", chat("hi", max_tokens=0), 400, "max_tokens", ""),
    ("absurd n", chat("hi", n=1000), 400, "n", "at most"),
    ("top_logprobs without logprobs", chat("hi", top_logprobs=2), 400, None, "logprobs"),
    ("too many stops", chat("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop", "stop"),
    ("negative stop token id", chat("hi", stop_token_ids=[3, -1]), 400, "stop_token_ids[1]", ""),
    ("stop token id past the vocabulary", chat("hi", stop_token_ids=[3, 10**6]), 400, "stop_token_ids", "vocabulary"),
    (
        "stop token id past the vocabulary, min_tokens",
        chat("hi", stop_token_ids=[10**6], min_tokens=1),
        400,
        "stop_token_ids",
        "vocabulary",
    ),
    ("logit_bias", chat("hi", logit_bias={"1": 5}), 400, "logit_bias", "not supported"),
    ("context too long", chat("word " * 5000), 400, "messages", "context length"),
    ("max_tokens over context", chat("hi", max_tokens=100000), 400, "max_tokens", "context length"),
    ("invalid base64", chat([image_part("data:image/png;base64,@@@notbase64@@@")]), 400, None, "base64"),
    ("not an image", chat([image_part("data:image/png;base64," + b64(b"hello world, not a png"))]), 400, None, ""),
    ("truncated png", chat([image_part("data:image/png;base64," + b64(png_bytes(64, 64)[:60]))]), 400, None, ""),
    (
        "unsupported audio format",
        chat([{"type": "input_audio", "input_audio": {"data": b64(b"xx"), "format": "tape"}}]),
        400,
        "messages[0].content[0].input_audio.format",
        "unsupported audio format",
    ),
    (
        "audio bytes that are not audio",
        chat([{"type": "input_audio", "input_audio": {"data": b64(b"\x00" * 64), "format": "wav"}}]),
        400,
        None,
        "",
    ),
    ("file url refused", chat([image_part("file:///etc/passwd")]), 400, None, ""),
    ("bare path refused", chat([image_part("/etc/passwd")]), 400, None, ""),
    ("ftp refused", chat([image_part("ftp://example.com/a.png")]), 400, None, ""),
    ("empty content list", chat([]), 400, "messages[0].content", ""),
    (
        "assistant turn with image",
        {
            "model": "tiny-omni",
            "messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        },
        400,
        "messages[0].content[0].type",
        "",
    ),
    ("stream_options without stream", chat("hi", stream_options={"include_usage": True}), 400, None, "stream"),
    ("stop too long", chat("hi", stop=["ok", "x" * (MAX_STOP_CHARS + 1)]), 400, "stop", f"at most {MAX_STOP_CHARS}"),
    ("seed above int64", chat("hi", seed=2**64), 400, "seed", "less than or equal"),
    ("seed below int64", chat("hi", seed=MIN_SEED - 1), 400, "seed", "greater than or equal"),
    ("deeply nested json", DEEP, 400, None, "nested too deeply"),
    ("lone surrogate", LONE_SURROGATE, 400, "messages[0].content", "surrogate"),
]

#: Requests refused with a 400 that used to be 500s after which uvicorn closed the connection.
ONCE_500 = [
    "stop token id past the vocabulary, min_tokens",
    "stop too long",
    "seed above int64",
    "seed below int64",
    "deeply nested json",
    "lone surrogate",
]


@pytest.mark.parametrize(("name", "body", "status", "param", "contains"), CASES, ids=[c[0] for c in CASES])
def test_bad_request(
    omni_server: RunningServer, name: str, body: Any, status: int, param: str | None, contains: str
) -> None:
    assert_error(post(omni_server, body), status, param=param, contains=contains)


def test_refusals_keep_the_keep_alive_connection(omni_server: RunningServer) -> None:
    """One client, one connection: every refusal is answered and the connection serves the next request."""
    cases = {c[0]: c[1] for c in CASES}
    with httpx.Client(base_url=omni_server.base_url, timeout=60) as http:
        addresses = set()
        for name in ONCE_500:
            body = cases[name]
            if isinstance(body, bytes):
                resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            else:
                resp = http.post("/v1/chat/completions", json=body)
            assert_error(resp, 400)
            addresses.add(resp.extensions["network_stream"].get_extra_info("client_addr"))
        resp = http.post("/v1/chat/completions", json=chat("still there?"))
        assert resp.status_code == 200, resp.text
        addresses.add(resp.extensions["network_stream"].get_extra_info("client_addr"))
    assert len(addresses) == 1  # the same connection carried every request


def test_image_the_processor_cannot_tile(omni_server: RunningServer) -> None:
    """A 1x400 image decodes fine but its aspect ratio is beyond what the vision processor tiles."""
    from tests.media_factory import image_bytes

    sliver = image_bytes("PNG", width=400, height=1)
    assert_error(post(omni_server, chat([image_part("data:image/png;base64," + b64(sliver))])), 400)


def test_per_request_max_pixels_may_lower_but_not_raise(omni_server: RunningServer) -> None:
    big = image_part("data:image/png;base64," + b64(png_bytes(256, 256)))
    full = post(omni_server, chat([big]))
    low = post(omni_server, chat([big], mm_processor_kwargs={"max_pixels": 56 * 56}))
    assert full.status_code == low.status_code == 200
    assert low.json()["usage"]["prompt_tokens"] < full.json()["usage"]["prompt_tokens"]
    too_high = post(omni_server, chat([big], mm_processor_kwargs={"max_pixels": 10**9}))
    assert_error(too_high, 400, param="mm_processor_kwargs.max_pixels")
    assert_error(
        post(omni_server, chat([big], mm_processor_kwargs={"fps": 1000})), 400, param="mm_processor_kwargs.fps"
    )


def test_stream_that_fails_midway_ends_with_an_error_event(
    omni_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault inside the engine (simulated: it cannot be caused for real) after tokens were sent."""
    import json

    engine = omni_server.engine
    real_step, calls = engine._decode_step, {"n": 0}

    def failing_step() -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated device fault")
        real_step()

    monkeypatch.setattr(engine, "_decode_step", failing_step)
    events = []
    with httpx.stream(
        "POST",
        omni_server.base_url + "/v1/chat/completions",
        timeout=60,
        json=chat("hi", stream=True, max_tokens=50, ignore_eos=True),
    ) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    monkeypatch.setattr(engine, "_decode_step", real_step)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "simulated device fault" in error["message"] and error["type"] == "server_error"
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2])
    assert post(omni_server, chat("still there?")).status_code == 200


def test_unknown_model_is_404(omni_server: RunningServer) -> None:
    body = chat("hi")
    body["model"] = "gpt-9"
    error = assert_error(post(omni_server, body), 404, param="model")
    assert error["code"] == "model_not_found"


def test_decompression_bomb_refused_fast(omni_server: RunningServer) -> None:
    bomb = png_with_declared_size(60000, 60000)
    start = time.perf_counter()
    resp = post(omni_server, chat([image_part("data:image/png;base64," + b64(bomb))]))
    assert time.perf_counter() - start < 2.0
    assert_error(resp, 400, contains="pixels")


def test_video_over_duration_cap(omni_server: RunningServer) -> None:
    long_clip = video_bytes("mp4", seconds=25, fps=2, width=32, height=32)  # the fixture caps video at 20 s
    resp = post(
        omni_server, chat([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(long_clip)}}])
    )
    assert_error(resp, 400, contains="over the limit of 20 s")


def test_audio_over_duration_cap(omni_server: RunningServer) -> None:
    long_audio = audio_bytes("flac", seconds=25, sample_rate=8000)
    resp = post(
        omni_server, chat([{"type": "input_audio", "input_audio": {"data": b64(long_audio), "format": "flac"}}])
    )
    assert_error(resp, 400, contains="over the limit of 20 s")


def test_video_bytes_declared_as_image(omni_server: RunningServer) -> None:
    clip = video_bytes("mp4", seconds=1, fps=4)
    assert_error(post(omni_server, chat([image_part("data:image/png;base64," + b64(clip))])), 400)


def test_private_address_refused_by_default(tiny_omni: Any) -> None:
    """The default policy (no allow_private_media_addresses) refuses loopback and metadata URLs."""
    import asyncio

    from omniserve.config import MediaLimits
    from omniserve.errors import MediaFetchForbidden
    from omniserve.media.fetch import fetch_media_bytes

    for url in (
        "http://127.0.0.1:1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a",
        "http://10.0.0.1/a.png",
    ):
        with pytest.raises(MediaFetchForbidden):
            asyncio.run(fetch_media_bytes(url, MediaLimits()))


def test_completions_bad_input(omni_server: RunningServer) -> None:
    assert_error(post(omni_server, {"model": "tiny-omni", "prompt": []}, "/v1/completions"), 400, param="prompt")
    assert_error(
        post(omni_server, {"model": "tiny-omni", "prompt": [999999]}, "/v1/completions"), 400, contains="vocabulary"
    )
    assert_error(
        post(omni_server, {"model": "tiny-omni", "prompt": "x", "echo": True}, "/v1/completions"), 400, param="echo"
    )


def test_unknown_route_is_openai_shaped_404(omni_server: RunningServer) -> None:
    resp = httpx.get(omni_server.base_url + "/v1/nothing-here")
    assert_error(resp, 404)


def test_server_still_serves_after_bad_input(omni_server: RunningServer) -> None:
    resp = post(omni_server, chat("hello"))
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"
