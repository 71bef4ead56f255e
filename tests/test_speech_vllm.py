"""Audio output with ``--engine vllm``: vLLM serves the thinker's text, the talker and codec run in-process beside it.

The speech component (``omniserve/speech``) loads the checkpoint itself and never asks which engine serves
text, so nothing is refused: ``/v1/audio/speech`` and chat audio output work as on the transformers engine,
at the cost of a second copy of the weights (thinker included) in the server's process. vLLM loads a full
Qwen2.5-Omni folder as its thinker and leaves the talker and token2wav weights out.

Skipped when ``vllm`` cannot be imported (build the environment with ``scripts/setup-vllm-cpu-env.sh``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/setup-vllm-cpu-env.sh builds an environment")

from tests.conftest import RunningServer, start_server

NAME = "tiny-speaking"
RATE = 24_000
MAX_SECONDS = 2.0
HI = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(speaking_model: Path) -> Iterator[RunningServer]:
    srv = start_server(
        speaking_model,
        name=NAME,
        engine_name="vllm",
        engine={"max_model_len": 2048, "threads": 1},
        server={"speech_max_seconds": MAX_SECONDS},
    )
    yield srv
    srv.stop()


def test_speech_endpoint_beside_vllm(server: RunningServer) -> None:
    client = server.client()
    listed = httpx.get(server.base_url + "/v1/audio/voices", timeout=30).json()
    assert listed == {"object": "list", "data": ["Chelsie", "Ethan"]}
    wav = client.audio.speech.create(model=NAME, input="The quick brown fox.", voice="Chelsie", response_format="wav")
    samples, rate = soundfile.read(io.BytesIO(wav.content), dtype="float32")
    assert rate == RATE and 0.015 <= len(samples) / RATE <= MAX_SECONDS + 0.1
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0


def test_chat_audio_output_beside_vllm(server: RunningServer) -> None:
    """vLLM writes the text; the talker speaks it: non-streamed wav and streamed pcm16 pieces."""
    client = server.client()
    reply = client.chat.completions.create(
        model=NAME,
        messages=HI,
        max_tokens=12,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
    )
    message = reply.choices[0].message
    assert message.content is None and message.audio is not None and message.audio.transcript
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == RATE and len(samples) > 0
    stream = client.chat.completions.create(
        model=NAME,
        messages=HI,
        max_tokens=12,
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "pcm16"},
        stream=True,
    )
    pieces = [
        chunk.choices[0].delta.audio.data
        for chunk in stream
        if chunk.choices and chunk.choices[0].delta.audio is not None and chunk.choices[0].delta.audio.data
    ]
    pcm = base64.b64decode("".join(pieces), validate=True)
    assert pieces and len(pcm) % 2 == 0 and len(pcm) > 0
