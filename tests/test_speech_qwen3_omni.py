"""Speech output of Qwen3-Omni end to end: the official client against real servers on a tiny full Qwen3-Omni
(thinker + talker + code predictor + code2wav, built by ``families.qwen3_omni.build_speaking``) and a tiny
thinker-only one (the family matrix's build).

The talker has random weights, so the audio is (near-silent) noise of random length; what is checked is what a
client relies on: a wav that decodes at the model's 24 kHz with some duration, spoken chat replies whole and
streamed, the checkpoint's own voices (an unknown one is a 400 listing them), and a 400 for audio asked of a
folder without a talker.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from omniserve.models.families import qwen3_omni
from tests.conftest import RunningServer
from tests.speaking_server import NAME, RATE, decode_audio, refusal, speaking_server
from tests.test_train_support import published_template

MAX_SECONDS = 1.0  # --speech-max-seconds: the random talker is cut there at the latest (12.5 frames a second)
TEXT = "The quick brown fox jumps over the lazy dog."
HI = [{"role": "user", "content": "Say something."}]
#: One codec frame is 1920 samples (80 ms); the causal decoder's edges may cut part of the first.
ONE_FRAME_SECONDS = 0.05


@pytest.fixture(scope="module")
def qwen3_omni_models(models_dir: Path) -> tuple[Path, Path]:
    """(full, thinker-only) tiny Qwen3-Omni folders, with the family's template fixture."""
    template = published_template(qwen3_omni.FAMILY.template or "")
    full = qwen3_omni.build_speaking(models_dir / "tiny-qwen3-omni-speaking", template)
    thinker = qwen3_omni.FAMILY.build(models_dir / "tiny-qwen3-omni", template)
    return full, thinker


@pytest.fixture(scope="module")
def server(qwen3_omni_models: tuple[Path, Path]) -> Iterator[RunningServer]:
    with speaking_server(qwen3_omni_models[0], speech_max_seconds=MAX_SECONDS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return server.client()


def test_voices_are_the_checkpoints_speakers(server: RunningServer) -> None:
    listed = httpx.get(server.base_url + "/v1/audio/voices", timeout=30).json()
    assert sorted(voice if isinstance(voice, str) else voice["id"] for voice in listed["data"]) == sorted(
        qwen3_omni.VOICES
    )


def test_a_wav_reply_decodes_at_the_model_rate(client: openai.OpenAI) -> None:
    response = client.audio.speech.create(model=NAME, input=TEXT, voice="ethan", response_format="wav")
    samples, rate = decode_audio(response.content, "wav")
    assert rate == RATE == 24_000
    assert ONE_FRAME_SECONDS <= len(samples) / RATE <= MAX_SECONDS + 0.1
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    assert response.response.headers["content-type"].startswith("audio/")


def test_an_unknown_voice_is_a_400_listing_the_valid_ones(client: openai.OpenAI) -> None:
    exc = refusal(lambda: client.audio.speech.create(model=NAME, input=TEXT, voice="Chelsea"))
    error = exc.response.json()["error"]
    assert exc.status_code == 400 and error["param"] == "voice"
    assert all(voice in error["message"] for voice in qwen3_omni.VOICES), error["message"]
    chat = refusal(
        lambda: client.chat.completions.create(
            model=NAME,
            messages=HI,
            max_tokens=2,
            modalities=["text", "audio"],
            audio={"voice": "nobody", "format": "wav"},
        )
    )
    assert chat.status_code == 400 and "chelsie" in chat.response.json()["error"]["message"]


def test_a_chat_reply_is_spoken_whole_and_streamed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=NAME,
        messages=HI,
        max_tokens=8,
        modalities=["text", "audio"],
        audio={"voice": "chelsie", "format": "wav"},
        extra_body={"ignore_eos": True},
    )
    audio = reply.choices[0].message.audio
    assert audio is not None and audio.transcript.strip() and reply.usage.completion_tokens == 8
    samples, rate = decode_audio(base64.b64decode(audio.data), "wav")
    assert rate == RATE and len(samples) / RATE >= ONE_FRAME_SECONDS

    stream = client.chat.completions.create(
        model=NAME,
        messages=HI,
        max_tokens=8,
        modalities=["text", "audio"],
        audio={"voice": "aiden", "format": "pcm16"},
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = [
        choice.delta.audio.model_dump(exclude_none=True)
        for chunk in stream
        for choice in chunk.choices
        if choice.delta.audio is not None
    ]
    pieces = [event["data"] for event in events if "data" in event]
    assert pieces and events[0].get("id") and events[-1].get("expires_at")
    samples, _ = decode_audio(b"".join(base64.b64decode(piece) for piece in pieces), "pcm16")
    assert len(samples) / RATE >= ONE_FRAME_SECONDS and np.isfinite(samples).all()


def test_first_audio_byte_arrives_before_the_body_ends(server: RunningServer) -> None:
    """The streamed body (pcm) starts with the first chunk the encoder writes; the time to it is logged."""
    body = {"model": NAME, "input": TEXT, "voice": "ethan", "response_format": "pcm"}
    started = time.perf_counter()
    with httpx.stream("POST", server.base_url + "/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        first = next(chunks)
        first_byte = time.perf_counter() - started
        rest = b"".join(chunks)
    assert first and len(first + rest) % 2 == 0
    print(f"qwen3-omni speech: first audio byte after {first_byte:.2f} s, {len(first + rest) / 2 / RATE:.2f} s audio")


def test_a_thinker_only_qwen3_omni_cannot_speak(qwen3_omni_models: tuple[Path, Path]) -> None:
    with speaking_server(qwen3_omni_models[1]) as srv:
        client = srv.client()
        exc = refusal(
            lambda: client.chat.completions.create(
                model=NAME,
                messages=HI,
                max_tokens=2,
                modalities=["text", "audio"],
                audio={"voice": "ethan", "format": "wav"},
            )
        )
        error = exc.response.json()["error"]
        assert exc.status_code == 400 and error["code"] == "audio_output_unsupported"
        assert error["param"] == "modalities" and "no talker" in error["message"]
        speech = refusal(lambda: client.audio.speech.create(model=NAME, input=TEXT, voice="ethan"))
        assert speech.status_code == 400 and speech.response.json()["error"]["code"] == "audio_output_unsupported"
        assert client.chat.completions.create(model=NAME, messages=HI, max_tokens=2).choices[0].message.content
