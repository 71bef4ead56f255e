"""The official openai client against a real server on the tiny omni model: every modality, streaming,
usage, n, logprobs, stop, determinism, and the legacy completions endpoint."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_server
from tests.media_factory import audio_bytes, png_bytes, video_bytes


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


IMAGE = {"type": "image_url", "image_url": {"url": data_url("image/png", png_bytes(64, 64))}}
VIDEO = {"type": "video_url", "video_url": {"url": data_url("video/mp4", video_bytes("mp4", seconds=2, fps=4))}}
AUDIO = {
    "type": "input_audio",
    "input_audio": {"data": base64.b64encode(audio_bytes("wav", 1.0)).decode(), "format": "wav"},
}


def user(*parts: dict[str, Any] | str) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def test_models_list(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-omni"]


def test_text_chat_reports_usage_and_honours_max_tokens(client: Any) -> None:
    out = client.chat.completions.create(
        model="tiny-omni",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
        ],
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens > 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert choice.message.role == "assistant"


def test_max_completion_tokens_is_an_alias(client: Any) -> None:
    out = client.chat.completions.create(
        model="tiny-omni", messages=user("hi"), max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("parts", "label"),
    [((IMAGE, "what colour?"), "image"), ((VIDEO, "where does it move?"), "video"), ((AUDIO, "high or low?"), "audio")],
)
def test_each_modality_adds_its_tokens(client: Any, parts: tuple[Any, ...], label: str) -> None:
    text_only = client.chat.completions.create(model="tiny-omni", messages=user(parts[-1]), max_tokens=2)
    with_media = client.chat.completions.create(model="tiny-omni", messages=user(*parts), max_tokens=2)
    # the media placeholder was expanded by the processor into many tokens
    assert with_media.usage.prompt_tokens > text_only.usage.prompt_tokens + 4, label


def test_mixed_media_in_any_order_and_several_of_each(client: Any) -> None:
    messages = user(AUDIO, "first", IMAGE, VIDEO, "then", IMAGE, AUDIO, VIDEO, "end")
    out = client.chat.completions.create(model="tiny-omni", messages=messages, max_tokens=3)
    single = client.chat.completions.create(model="tiny-omni", messages=user(AUDIO, IMAGE, VIDEO, "end"), max_tokens=3)
    assert out.usage.prompt_tokens > single.usage.prompt_tokens + 20
    assert out.choices[0].finish_reason in {"stop", "length"}


def test_streaming_matches_non_streaming_and_reports_usage(client: Any) -> None:
    kwargs = dict(
        model="tiny-omni",
        messages=user(IMAGE, "describe"),
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_greedy_is_deterministic_and_seed_reproduces_sampling(client: Any) -> None:
    kwargs = dict(model="tiny-omni", messages=user("tell me a story"), max_tokens=16, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    b = client.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    assert a == b
    s1 = client.chat.completions.create(temperature=1.5, seed=123, **kwargs).choices[0].message.content
    s2 = client.chat.completions.create(temperature=1.5, seed=123, **kwargs).choices[0].message.content
    s3 = client.chat.completions.create(temperature=1.5, seed=999, **kwargs).choices[0].message.content
    assert s1 == s2
    assert s1 != s3


@pytest.fixture(scope="module")
def float32_client(tiny_omni: Path) -> Iterator[Any]:
    """A float32 server: batch invariance is a float32 property (see the test below)."""
    srv = start_server(tiny_omni, name="tiny-omni", engine={"dtype": "float32", "max_concurrency": 8})
    yield srv.client()
    srv.stop()


def test_batched_greedy_equals_alone(float32_client: Any) -> None:
    """Continuous batching must not change a request's output: the KV cache padding is exact.

    Checked in float32. In bfloat16 (``--dtype auto`` on CPUs with native bf16) a matmul's rounding
    depends on how many rows it multiplies, so a batched row may drift from its lone run after a few
    tokens, as in vLLM; that is arithmetic, not the padding this test protects.
    """
    client = float32_client
    prompts = [user("one"), user(IMAGE, "two words here please"), user("three " * 30), user(AUDIO, "four")]

    def run(messages: list[dict[str, Any]]) -> str:
        out = client.chat.completions.create(
            model="tiny-omni", messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].message.content

    alone = [run(m) for m in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def test_n_choices_with_logprobs(client: Any) -> None:
    out = client.chat.completions.create(
        model="tiny-omni",
        messages=user("hi"),
        n=3,
        max_tokens=5,
        temperature=1.0,
        seed=7,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 15
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 5
        for item in content:
            assert item.logprob <= 0.0
            assert len(item.top_logprobs) == 3
            tops = [t.logprob for t in item.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert item.logprob <= tops[0] + 1e-5


def test_stop_string_truncates_output(client: Any) -> None:
    kwargs = dict(
        model="tiny-omni", messages=user("count"), max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(free) > 6
    stop = free[3:6]
    cut = client.chat.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[: free.index(stop)]
    streamed = client.chat.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == free[: free.index(stop)]


def test_stop_token_ids_end_a_choice(client: Any, tiny_omni: Path) -> None:
    """vLLM's ``stop_token_ids`` extra body field, on every engine: a choice ends at the first of these
    ids (finish reason "stop", the id counted but its text left out) even with ignore_eos, and not
    before ``min_tokens``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_omni))
    kwargs = {"model": "tiny-omni", "prompt": "The quick brown", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    free = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    tokens = free.choices[0].logprobs.tokens  # each generated token decoded alone
    target = tokens[min(3, len(tokens) - 1)]
    first = tokens.index(target)
    # every id decoding to that text, so the choice stops exactly where that text first appears
    stop_ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == target]

    stopped = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "stop_token_ids": stop_ids})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == first + 1
    assert stopped.choices[0].logprobs.tokens == tokens[: first + 1]
    assert free.choices[0].text.startswith(stopped.choices[0].text)

    held = client.completions.create(
        **kwargs, extra_body={"ignore_eos": True, "stop_token_ids": stop_ids, "min_tokens": first + 2}
    )
    assert held.usage.completion_tokens >= first + 2
    assert target not in held.choices[0].logprobs.tokens[: first + 2]


def test_sampling_options_are_accepted(client: Any) -> None:
    out = client.chat.completions.create(
        model="tiny-omni",
        messages=user("hi"),
        max_tokens=4,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )
    assert out.usage.completion_tokens <= 4


def test_legacy_completions(client: Any) -> None:
    out = client.completions.create(
        model="tiny-omni", prompt="The quick brown", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion"
    assert out.usage.completion_tokens == 5
    batch = client.completions.create(
        model="tiny-omni",
        prompt=["a", "b c"],
        max_tokens=3,
        n=2,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 3 for c in batch.choices)
    streamed = client.completions.create(
        model="tiny-omni",
        prompt="The quick brown",
        max_tokens=5,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


@pytest.fixture(scope="module")
def media_http_server() -> Iterator[str]:
    files = {
        "/pic.png": png_bytes(64, 64),
        "/clip.webm": video_bytes("webm", 1, 4),
        "/tone.mp3": audio_bytes("mp3", 1.0),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_media_urls(client: Any, media_http_server: str) -> None:
    messages = user(
        {"type": "image_url", "image_url": {"url": f"{media_http_server}/pic.png"}},
        {"type": "video_url", "video_url": {"url": f"{media_http_server}/clip.webm"}},
        {"type": "audio_url", "audio_url": {"url": f"{media_http_server}/tone.mp3"}},
        "all three",
    )
    out = client.chat.completions.create(model="tiny-omni", messages=messages, max_tokens=2)
    assert out.usage.prompt_tokens > 30


def test_per_request_video_fps_changes_token_count(client: Any) -> None:
    clip = {"type": "video_url", "video_url": {"url": data_url("video/mp4", video_bytes("mp4", seconds=4, fps=8))}}
    low = client.chat.completions.create(
        model="tiny-omni", messages=user(clip, "x"), max_tokens=1, extra_body={"mm_processor_kwargs": {"fps": 1.0}}
    )
    high = client.chat.completions.create(
        model="tiny-omni", messages=user(clip, "x"), max_tokens=1, extra_body={"mm_processor_kwargs": {"fps": 2.0}}
    )
    assert high.usage.prompt_tokens > low.usage.prompt_tokens
