"""One request cannot make the server decode without bound (issue 12, items 2 and 8).

Reproduced before these limits existed: a 5.5 MB chat request with 1,520 audio clips of 0.3 s made the
server allocate about 23 GB (the audio feature extractor pads every clip to 30 s) until the kernel's
out-of-memory killer ended it. These tests send such requests to a real server on loopback, through the
official openai client, without ever exhausting memory: the refusals must come before any decoding.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import omniserve.media.loader as loader_module
from omniserve.config import DeployOptions, MediaLimits
from omniserve.errors import MediaBudgetExceeded, MediaBusy, MediaDecodeTimeout, MediaError
from omniserve.flags import OptionError, parse_argv
from omniserve.media.budget import MediaGate
from omniserve.media.loader import MediaOptions, MediaSource, load_media, loaded_media
from tests.conftest import RunningServer, start_server
from tests.media_factory import audio_bytes, png_bytes, video_bytes

MODEL = "tiny-omni"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(data: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(data)}}


def video_part(data: bytes) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(data)}}


def audio_part(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def ask(client: openai.OpenAI, parts: list[dict[str, Any]], **extra: Any) -> Any:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, *parts]}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **extra)


def refusal(client: openai.OpenAI, parts: list[dict[str, Any]], **extra: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, parts, **extra)
    return info.value


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (the test servers run in it), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Linux resets VmHWM (peak RSS) when 5 is written to clear_refs, so a peak can be measured per phase."""
    Path("/proc/self/clear_refs").write_text("5")


class Spy:
    """Counts calls of a loader function (fetching, decoding) and can hold them until released."""

    def __init__(self, real: Callable[..., Any], hold: Callable[..., bool] | None = None) -> None:
        self.real, self.hold = real, hold
        self.calls = 0
        self.holding = 0
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        result = self.real(*args, **kwargs)
        if self.hold is not None and self.hold(result):
            self.holding += 1
            assert self.release.wait(30), "the test never released the held decode"
        return result


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, Spy]:
    """Every fetch and full decode the loader makes, counted (the servers run in this process)."""
    found = {}
    for name in ("fetch_media_bytes", "decode_image", "decode_video", "decode_audio"):
        spy = Spy(getattr(loader_module, name))
        monkeypatch.setattr(loader_module, name, spy)
        found[name] = spy
    return found


# --- item 2: per-request limits, decided before anything is fetched -----------------------------------


def test_two_hundred_clips_are_refused_before_anything_is_fetched(
    omni_server: RunningServer, spies: dict[str, Spy]
) -> None:
    """The reproduction, scaled down: 200 clips of 0.3 s (1,520 of them made the server allocate 23 GB)."""
    clip = audio_bytes("wav", seconds=0.3, sample_rate=16_000)
    parts = [audio_part(clip) for _ in range(200)]
    client = omni_server.client()
    ask(client, [audio_part(clip)])  # warm: the first request loads what the renderer imports lazily
    rss_before = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    exc = refusal(client, parts)
    took = time.perf_counter() - started
    peak_growth = rss_bytes("VmHWM") - rss_before
    error = error_of(exc)
    assert exc.status_code == 400 and error["code"] == "too_many_media_items", error
    assert "200 audio" in error["message"] and "--limit-media-per-request audio=4" in error["message"], error
    assert error["param"] == "messages[0].content[5]", "the first part over the limit"
    assert spies["fetch_media_bytes"].calls == 1 and spies["decode_audio"].calls == 1, "only the warm-up request's"
    assert took < 3.0, f"refused in {took:.2f} s"
    assert peak_growth < 200 * 1024 * 1024, f"peak RSS grew {peak_growth / 2**20:.0f} MiB"
    print(f"\n200 clips ({len(clip) * 200 * 4 // 3 / 1e6:.1f} MB of base64): 400 in {took * 1000:.0f} ms, "
          f"peak RSS +{peak_growth / 2**20:.1f} MiB")  # fmt: skip


def test_limits_per_kind_are_flags_with_defaults() -> None:
    defaults = MediaLimits()
    assert {kind: defaults.media_per_request(kind) for kind in ("image", "video", "audio")} == {
        "image": 16,
        "video": 2,
        "audio": 4,
    }
    given = parse_argv(DeployOptions, ["--limit-media-per-request", "image=3,video=0"], what="deploy")
    assert given.server.media.limit_media_per_request == {"image": 3, "video": 0}
    repeated = parse_argv(
        DeployOptions, ["--limit-media-per-request", "audio=1", "--limit-media-per-request", "image=2"], what="deploy"
    )
    assert repeated.server.media.media_per_request("audio") == 1
    assert repeated.server.media.media_per_request("video") == 2, "kinds not given keep their default"
    with pytest.raises(OptionError, match=r"--limit-media-per-request.*'pictures'"):
        parse_argv(DeployOptions, ["--limit-media-per-request", "pictures=3"], what="deploy")
    with pytest.raises(OptionError, match="--limit-media-per-request"):
        parse_argv(DeployOptions, ["--limit-media-per-request", "image=-1"], what="deploy")


BUDGET_LIMITS = MediaLimits(
    allow_private_media_addresses=True,
    limit_media_per_request={"image": 8, "video": 0},
    max_pixels_per_request=60_000,
    max_audio_seconds_per_request=3.0,
    max_concurrent_decodes=2,
    max_decoded_media_bytes=400_000,  # one request: 60,000 px x 3 B + 3 s x 16 kHz x 4 B = 372,000 B
    media_wait_timeout_seconds=0.5,
)


@pytest.fixture(scope="module")
def budget_server(tiny_omni: Path) -> Iterator[RunningServer]:
    srv = start_server(tiny_omni, name=MODEL, engine={"max_model_len": 2048}, server={"media": BUDGET_LIMITS})
    yield srv
    srv.stop()


def test_a_zero_limit_refuses_the_kind(budget_server: RunningServer, spies: dict[str, Spy]) -> None:
    exc = refusal(budget_server.client(), [video_part(video_bytes("mp4", seconds=1, fps=4))])
    error = error_of(exc)
    assert exc.status_code == 400 and "video=0" in error["message"], error
    assert spies["fetch_media_bytes"].calls == 0


def test_pixel_budget_is_refused_from_the_headers_before_decoding(
    budget_server: RunningServer, spies: dict[str, Spy]
) -> None:
    client = budget_server.client()
    started = time.perf_counter()
    exc = refusal(client, [image_part(png_bytes(128, 128)) for _ in range(4)])  # 65,536 pixels > 60,000
    took = time.perf_counter() - started
    error = error_of(exc)
    assert exc.status_code == 400 and error["code"] == "media_budget_exceeded", error
    assert "65536 pixels" in error["message"] and "--max-pixels-per-request" in error["message"], error
    assert error["param"] == "messages[0].content[4]", "the part that went over"
    assert spies["decode_image"].calls == 0, "headers only: no image was decoded"
    assert took < 2.0
    assert ask(client, [image_part(png_bytes(128, 128)) for _ in range(3)]).choices, "49,152 pixels fit"


def test_audio_seconds_budget(budget_server: RunningServer, spies: dict[str, Spy]) -> None:
    client = budget_server.client()
    clip = audio_bytes("wav", seconds=2.0, sample_rate=16_000)
    exc = refusal(client, [audio_part(clip), audio_part(clip)])
    error = error_of(exc)
    assert exc.status_code == 400 and error["code"] == "media_budget_exceeded", error
    assert "--max-audio-seconds-per-request" in error["message"] and "3 s" in error["message"], error
    assert spies["decode_audio"].calls == 0, "the declared durations already exceed the budget"
    assert ask(client, [audio_part(clip)]).choices


def test_audio_budget_holds_when_headers_say_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a declared duration the budget is enforced on the samples as they are decoded."""
    import omniserve.media.audio as audio_module

    monkeypatch.setattr(audio_module, "declared_seconds", lambda container, stream: None)
    clip = audio_bytes("wav", seconds=2.0, sample_rate=16_000)
    sources = [MediaSource(kind="audio", param=f"p{i}", inline_base64=b64(clip)) for i in range(2)]
    with pytest.raises(MediaBudgetExceeded, match="max-audio-seconds-per-request") as info:
        asyncio.run(load_media(sources, MediaLimits(max_audio_seconds_per_request=3.0)))
    assert info.value.param in {"p0", "p1"}


# --- item 2: a process-wide bound, owned by the app ---------------------------------------------------


def _held(spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch, sizes: set[tuple[int, int]]) -> Spy:
    """Images of these sizes stay 'decoding' until released: a stand-in for a long decode."""
    spy = Spy(spies["decode_image"].real, hold=lambda image: image.size in sizes)
    monkeypatch.setattr(loader_module, "decode_image", spy)
    return spy


CLIP = audio_bytes("wav", seconds=0.5, sample_rate=16_000)
BUSY_CASES = {
    # two held 120x120 decodes fill both decode slots: a request of one small image waits for a slot
    "decode slots": ([image_part(png_bytes(120, 120))] * 2, [image_part(png_bytes(32, 32))], 2),
    # a held 200x200 image keeps 120,000 of the 400,000 bytes; four 100x100 images (120,000 B) and a clip
    # (the audio budget's 3 s x 16 kHz x 4 B = 192,000 B) need 312,000: more than is free, less than the bound
    "decoded bytes": ([image_part(png_bytes(200, 200))], [image_part(png_bytes(100, 100))] * 4 + [audio_part(CLIP)], 1),
}
WORDING = {"decode slots": "decode slots", "decoded bytes": "memory"}


@pytest.mark.parametrize("case", BUSY_CASES)
def test_a_busy_server_answers_503_with_retry_after(
    budget_server: RunningServer, spies: dict[str, Spy], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    holder, waiter, holds = BUSY_CASES[case]
    held = _held(spies, monkeypatch, {(120, 120), (200, 200)})
    client = budget_server.client()
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.setdefault("first", ask(client, holder)))
    first.start()
    try:
        deadline = time.monotonic() + 30
        while held.holding < holds:
            assert time.monotonic() < deadline, "the first request never reached its decodes"
            time.sleep(0.01)
        started = time.perf_counter()
        exc = refusal(client, waiter)
        waited = time.perf_counter() - started
    finally:
        held.release.set()
        first.join(60)
    error = error_of(exc)
    assert exc.status_code == 503 and error["code"] == "media_busy", error
    assert exc.response.headers["retry-after"] == "1"
    assert WORDING[case] in error["message"] and "--media-wait-timeout" in error["message"], error
    assert 0.4 < waited < 5.0, f"waited {waited:.2f} s for a 0.5 s bound"
    assert results["first"].choices, "the request that held the capacity still completes"
    assert ask(client, waiter).choices, "and once it is done the waiter fits"
    print(f"\n{case}: 503 after {waited * 1000:.0f} ms")


def test_the_bound_must_hold_one_whole_request() -> None:
    with pytest.raises(ValueError, match="max-decoded-media-bytes"):
        MediaLimits(max_decoded_media_bytes=10_000_000)
    MediaLimits(max_decoded_media_bytes=10_000_000, max_pixels_per_request=3_000_000, max_audio_seconds_per_request=1)


def _burst(server: RunningServer, parts: list[dict[str, Any]], count: int) -> tuple[int, float, list[Any]]:
    """``count`` identical requests at once; returns (peak RSS growth in bytes, seconds, answers)."""
    client = server.client()
    # one request alone first: the growth measured below is what concurrency adds to one request's footprint
    ask(client, parts, extra_body={"mm_processor_kwargs": {"max_pixels": 56 * 56 * 4}})
    before = rss_bytes()
    reset_peak_rss()
    answers: list[Any] = [None] * count

    def one(index: int) -> None:
        try:
            answers[index] = ask(client, parts, extra_body={"mm_processor_kwargs": {"max_pixels": 56 * 56 * 4}})
        except openai.APIStatusError as exc:
            answers[index] = exc

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return rss_bytes("VmHWM") - before, time.perf_counter() - started, answers


@pytest.mark.slow
def test_concurrent_requests_wait_their_turn_and_memory_stays_bounded(tiny_omni: Path) -> None:
    """Eight requests, each decoding three 2048x2048 images (37.7 MB of RGB), sent at once: with a
    64 MiB bound they decode one request at a time and all succeed; without it they decode together."""
    big = png_bytes(2048, 2048)
    parts = [image_part(big) for _ in range(3)]
    bounded = MediaLimits(
        max_pixels_per_request=16_000_000,
        max_audio_seconds_per_request=10,
        max_decoded_media_bytes=64 * 2**20,
        media_wait_timeout_seconds=60,
    )
    unbounded = bounded.model_copy(update={"max_decoded_media_bytes": 8 * 2**30, "max_concurrent_decodes": 64})
    peaks = {}
    for name, limits in (("bounded", bounded), ("unbounded", unbounded)):
        srv = start_server(tiny_omni, name=MODEL, engine={"max_model_len": 2048}, server={"media": limits})
        try:
            peak, took, answers = _burst(srv, parts, 8)
        finally:
            srv.stop()
        assert all(not isinstance(answer, Exception) for answer in answers), answers
        peaks[name] = peak
        print(f"\n{name}: 8 x 3 x 2048x2048 images, peak RSS +{peak / 2**20:.0f} MiB, {took:.1f} s")
    # measured on 2 cores over five runs: bounded +94 to +176 MiB, unbounded +476 to +573 MiB. The bound
    # counts decoded media, not the renderer's copies of the request holding it nor allocator slack.
    assert peaks["bounded"] < 4 * 64 * 2**20
    assert peaks["bounded"] < peaks["unbounded"] / 2


def test_the_gate_belongs_to_the_app(budget_server: RunningServer, omni_server: RunningServer) -> None:
    gates = [srv.app.state.ctx.media_gate for srv in (budget_server, omni_server)]
    assert all(isinstance(gate, MediaGate) for gate in gates) and gates[0] is not gates[1]
    assert gates[0].max_decoded_bytes == 400_000 and gates[0].max_concurrent_decodes == 2


# --- item 8: decoding has a deadline and stops when the request goes away -------------------------------


def test_deadline_over_http_names_the_option(tiny_omni: Path) -> None:
    limits = MediaLimits(allow_private_media_addresses=True, media_decode_timeout_seconds=0.001)
    srv = start_server(tiny_omni, name=MODEL, engine={"max_model_len": 2048}, server={"media": limits})
    try:
        long_video = video_bytes("avi", seconds=60, fps=25, width=64, height=64)
        exc = refusal(srv.client(), [video_part(long_video)])
    finally:
        srv.stop()
    error = error_of(exc)
    assert exc.status_code == 400 and error["code"] == "media_decode_timeout", error
    assert "--media-decode-timeout" in error["message"] and "0.001 s" in error["message"], error
    assert error["param"] == "messages[0].content[1]"


def test_a_cancelled_request_stops_its_decoder() -> None:
    """A client that goes away cancels prepare(); the decoding thread must stop too, not run to the end."""
    data = video_bytes("avi", seconds=120, fps=25, width=160, height=120)
    limits = MediaLimits(max_video_seconds=600, video_fps=2, max_video_frames=240)
    source = MediaSource(kind="video", param="v", url="data:video/x-msvideo;base64," + b64(data))

    async def full() -> float:
        started = time.perf_counter()
        await load_media([source], limits, MediaOptions())
        return time.perf_counter() - started

    async def cancelled(gate: MediaGate) -> tuple[float, int]:
        async def load() -> None:
            async with loaded_media([source], limits, MediaOptions(), gate):
                pass

        task = asyncio.ensure_future(load())
        while gate.decoded_bytes_held == 0:  # headers read, bytes reserved: the decode has started
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        assert gate.decodes_running == 1 and not task.done()
        started = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - started, gate.decodes_running

    whole = asyncio.run(full())
    gate = MediaGate(limits)
    stopped_in, running = asyncio.run(cancelled(gate))
    assert running == 0, "the cancel returns only once the decoding thread has stopped"
    assert gate.decoded_bytes_held == 0, "and its reservation is given back"
    assert stopped_in < whole / 2, f"stopped in {stopped_in:.3f} s; a whole decode takes {whole:.3f} s"
    print(f"\ncancelled decode stopped in {stopped_in * 1000:.1f} ms (whole decode {whole * 1000:.0f} ms)")


def test_decode_errors_stay_media_errors() -> None:
    assert issubclass(MediaDecodeTimeout, MediaError) and issubclass(MediaBudgetExceeded, MediaError)
    assert MediaBusy("x").status_code == 503


# --- the new flags travel to Kubernetes with their values ----------------------------------------------


def test_new_media_flags_travel_to_the_pod(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.test_helm import parse_with_cli, server, start_helm
    from tests.test_k8s_values import render_dumped, values_for

    argv = [
        "--model", str(tmp_path / "m"),
        "--limit-media-per-request", "image=3",
        "--limit-media-per-request", "audio=0",
        "--max-pixels-per-request", "5000000",
        "--max-audio-seconds-per-request", "90.5",
        "--max-concurrent-decodes", "3",
        "--max-decoded-media-bytes", "536870912",
        "--media-wait-timeout", "2.5",
        "--media-decode-timeout", "7.5",
    ]  # fmt: skip
    local = parse_argv(DeployOptions, argv, what="deploy")
    docs = render_dumped(start_helm(tmp_path_factory), values_for(argv), tmp_path)
    pod_args = server(docs)["args"]
    pod = parse_argv(DeployOptions, pod_args, what="deploy")
    assert pod.server.media.model_dump(exclude={"allowed_local_media_path"}) == local.server.media.model_dump(
        exclude={"allowed_local_media_path"}
    )
    assert sorted(parse_with_cli(pod_args)["limit_media_per_request"]) == ["audio=0", "image=3"]


def test_the_transformers_engine_lets_media_go_once_prefilled(tiny_qwen2_vl: Path) -> None:
    """Decoded media and the processor's tensors are dropped once the KV cache holds them, not at the last token."""
    import asyncio

    from PIL import Image

    from omniserve.config import EngineConfig
    from omniserve.engines.base import GenerationRequest
    from omniserve.engines.transformers_engine import TransformersEngine
    from omniserve.media.loader import MediaItem
    from omniserve.sampling import SamplingParams
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(tiny_qwen2_vl)
    content = [{"type": "image"}, {"type": "text", "text": "what colour?"}]
    prompt = renderer.render_chat(
        [{"role": "user", "content": content}], [MediaItem("image", Image.new("RGB", (64, 64), (200, 0, 0)))]
    )
    assert prompt.mm_inputs and prompt.media
    request = GenerationRequest("media-release", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    async def scenario() -> tuple[dict[str, object], int, int]:
        engine = TransformersEngine(EngineConfig(model=tiny_qwen2_vl, served_model_name="m"))
        await engine.start()
        try:
            stream = engine.generate(request)
            await anext(stream)  # the first token: the prompt is prefilled, seven more tokens to go
            held = (dict(request.prompt.mm_inputs), len(request.prompt.media), len(request.prompt.token_ids))
            async for _ in stream:
                pass
            return held
        finally:
            await engine.stop()

    mm_inputs, media, tokens = asyncio.run(scenario())
    assert mm_inputs == {} and media == 0, "still referenced while the other tokens are generated"
    assert tokens == len(prompt.token_ids), "the prompt's ids stay (usage, context length)"
