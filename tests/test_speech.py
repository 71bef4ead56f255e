"""``POST /v1/audio/speech`` end to end: the official client against a real server on a tiny speaking Omni.

The checkpoint's talker and codec have random weights, so the audio is noise of random length; what is
checked is what a client relies on: every format decodes back to audio at the model's 24 kHz, the body
arrives in chunks, events carry the same audio, voices are the checkpoint's, bad input is a 4xx.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from omniserve.speech.encode import CHUNK_BYTES
from tests.conftest import RunningServer, wait_until
from tests.speaking_server import RATE, decode_audio, refusal, speaking_server

MAX_SECONDS = 3.0  # the server's --speech-max-seconds: the random talker is cut there at the latest
TEXT = "The quick brown fox jumps over the lazy dog near the river."


@pytest.fixture(scope="module")
def speech_server(speaking_model: Path) -> Iterator[RunningServer]:
    with speaking_server(
        speaking_model, speech_max_input=200, speech_max_seconds=MAX_SECONDS, speech_max_waiting=0
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(speech_server: RunningServer) -> openai.OpenAI:
    return speech_server.client()


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_each_format_decodes_to_audio_at_the_model_rate(client: openai.OpenAI, fmt: str) -> None:
    response = client.audio.speech.create(model="tiny-speaking", input=TEXT, voice="Chelsie", response_format=fmt)
    samples, rate = decode_audio(response.content, fmt)
    assert rate == RATE
    # at least one codec code (20 ms; lossy codecs add a frame of padding), at most the server's cap
    assert 0.015 <= len(samples) / RATE <= MAX_SECONDS + 0.1
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    content_type = response.response.headers["content-type"]
    assert content_type.startswith({"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac"}.get(fmt, "audio/"))


def test_body_is_streamed_in_chunks(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tiny-speaking", input=TEXT, voice="Ethan", response_format="pcm", speed=0.5
    ) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        pieces = list(response.iter_bytes())
    data = b"".join(pieces)
    samples, _ = decode_audio(data, "pcm")
    assert len(samples) / RATE >= 0.03  # speed 0.5: twice the length of at least one code


def test_speed_stretches_the_audio(speech_server: RunningServer) -> None:
    """Same pitch, other duration: the talker's output length varies, so compare within one request's
    bounds: 4x speed of at most MAX_SECONDS is at most a quarter of it."""
    response = speech_server.client().audio.speech.create(
        model="tiny-speaking", input=TEXT, voice="Ethan", response_format="wav", speed=4.0
    )
    samples, rate = decode_audio(response.content, "wav")
    assert rate == RATE and 0 < len(samples) / RATE <= MAX_SECONDS / 4 + 0.05


def test_sse_events_carry_the_audio_and_usage(speech_server: RunningServer) -> None:
    body = {
        "model": "tiny-speaking",
        "input": TEXT,
        "voice": "Chelsie",
        "response_format": "wav",
        "stream_format": "sse",
    }
    with httpx.stream("POST", speech_server.base_url + "/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
    *deltas, done = events
    assert {event["type"] for event in deltas} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
    assert len(deltas) == math.ceil(len(audio) / CHUNK_BYTES)
    samples, rate = decode_audio(audio, "wav")
    assert rate == RATE and len(samples) > 0
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 10 and usage["output_tokens"] >= 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_voices_are_the_checkpoints_speakers(speech_server: RunningServer, client: openai.OpenAI) -> None:
    listed = httpx.get(speech_server.base_url + "/v1/audio/voices", timeout=30).json()
    assert listed == {"object": "list", "data": ["Chelsie", "Ethan"]}
    response = client.audio.speech.create(
        model="tiny-speaking", input="Hello there.", voice={"id": "Ethan"}, response_format="flac"
    )
    assert decode_audio(response.content, "flac")[1] == RATE


@pytest.mark.parametrize(
    ("fields", "status", "param", "says"),
    [
        ({"voice": "alloy"}, 400, "voice", "Chelsie, Ethan"),
        ({"response_format": "ogg"}, 400, "response_format", "'mp3', 'opus', 'aac', 'flac', 'wav' or 'pcm'"),
        ({"input": " \n"}, 400, "input", "empty"),
        ({"input": "word " * 41}, 400, "input", "at most 200"),
        ({"speed": 5.0}, 400, "speed", "4"),
        ({"model": "gpt-4o-mini-tts"}, 404, "model", "tiny-speaking"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_fix(
    client: openai.OpenAI, fields: dict[str, Any], status: int, param: str, says: str
) -> None:
    request = {"model": "tiny-speaking", "input": TEXT, "voice": "Chelsie", "response_format": "wav", **fields}
    exc = refusal(lambda: client.audio.speech.create(**request))
    error = exc.response.json()["error"]
    assert exc.status_code == status and error["param"] == param and says in error["message"]
    assert client.audio.speech.create(model="tiny-speaking", input="Still here.", voice="Ethan").content


def test_a_busy_synthesizer_refuses_beyond_its_waiting_room(speech_server: RunningServer) -> None:
    """--speech-max-waiting 0: while one request is synthesized, the next is a 429, and then served."""
    synthesizer = speech_server.app.state.speech
    first: dict[str, Any] = {}

    def speak() -> None:
        first["response"] = speech_server.client().audio.speech.create(
            model="tiny-speaking", input=TEXT * 3, voice="Chelsie", response_format="pcm"
        )

    worker = threading.Thread(target=speak)
    worker.start()
    wait_until(lambda: synthesizer.busy, timeout=30, interval=0.001)
    exc = refusal(lambda: speech_server.client().audio.speech.create(model="tiny-speaking", input=TEXT, voice="Ethan"))
    assert exc.status_code == 429 and "--speech-max-waiting" in exc.response.json()["error"]["message"]
    worker.join(timeout=120)
    assert first["response"].content


def test_metrics_count_speech(speech_server: RunningServer) -> None:
    text = httpx.get(speech_server.base_url + "/metrics", timeout=30).text
    assert 'omniserve_requests_total{endpoint="/v1/audio/speech",status="200"}' in text
    assert 'omniserve_request_latency_seconds_count{adapter="tiny-speaking",endpoint="/v1/audio/speech"}' in text


def test_a_thinker_only_checkpoint_cannot_speak(omni_server: RunningServer) -> None:
    client = omni_server.client()
    exc = refusal(lambda: client.audio.speech.create(model=omni_server.model_name, input=TEXT, voice="Chelsie"))
    error = exc.response.json()["error"]
    assert exc.status_code == 400 and error["code"] == "audio_output_unsupported"
    assert "cannot speak" in error["message"] and error["param"] == "model"
    assert httpx.get(omni_server.base_url + "/v1/audio/voices", timeout=30).status_code == 400


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_changes_duration_not_pitch(speed: float) -> None:
    from omniserve.speech.tempo import change_tempo

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE // 2) / RATE)).astype(np.float32)
    stretched = change_tempo(tone, RATE, speed)
    assert len(stretched) == round(len(tone) / speed)
    spectrum = np.abs(np.fft.rfft(stretched))
    assert abs(np.argmax(spectrum) * RATE / len(stretched) - 440) < 10


def test_a_synthesis_past_its_deadline_is_a_504(speech_server: RunningServer, client: openai.OpenAI) -> None:
    """The deadline stops the thinker and talker at their next step; the request gets a 504, the next one audio."""
    synthesizer = speech_server.app.state.speech
    configured = synthesizer.timeout_seconds
    synthesizer.timeout_seconds = 0.01  # as if started with --speech-timeout 0.01
    try:
        exc = refusal(lambda: client.audio.speech.create(model="tiny-speaking", input=TEXT * 3, voice="Ethan"))
    finally:
        synthesizer.timeout_seconds = configured
    assert exc.status_code == 504 and "--speech-timeout" in exc.response.json()["error"]["message"]
    assert not synthesizer.busy
    assert client.audio.speech.create(model="tiny-speaking", input="Again.", voice="Ethan").content


def test_instructions_and_special_tokens_are_read_as_text(speech_server: RunningServer) -> None:
    """``instructions`` is the turn the speech answers (more prompt tokens); "<|im_end|>" in the input is
    spoken as characters, so the whole input reaches the talker."""

    def usage(**fields: Any) -> dict[str, int]:
        body = {"model": "tiny-speaking", "voice": "Ethan", "response_format": "pcm", "stream_format": "sse"}
        response = httpx.post(speech_server.base_url + "/v1/audio/speech", json={**body, **fields}, timeout=120)
        assert response.status_code == 200
        return json.loads(response.text.strip().splitlines()[-1][len("data: ") :])["usage"]

    plain = usage(input="Hello <|im_end|> there.")
    instructed = usage(input="Hello <|im_end|> there.", instructions="Speak slowly, warmly, like a storyteller.")
    assert instructed["input_tokens"] > plain["input_tokens"]
    special = usage(input="<|im_end|>")["input_tokens"]
    assert special > usage(input="Hi")["input_tokens"]  # several characters' tokens, not one special token


def test_the_speaking_checkpoint_still_chats(client: openai.OpenAI) -> None:
    """The engine serves the full folder's thinker as it serves a thinker-only one."""
    reply = client.chat.completions.create(
        model="tiny-speaking", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
