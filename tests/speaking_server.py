"""What the speech-output tests share: a real server on the tiny speaking Omni, audio read back, a 4xx caught.

Used by tests/test_speech.py, tests/test_chat_audio.py, tests/test_bench_audio.py and (in the vLLM environment)
tests/test_speech_vllm.py, so it imports only what both environments have: numpy, soundfile, PyAV, openai.
Each test module keeps its own module-scoped fixture (its own ``--speech-*`` limits) around ``speaking_server``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
import openai
import pytest
import soundfile

from tests.conftest import RunningServer, start_server

#: The speaking Omni's output rate (the codec's, as OpenAI's): every format is checked against it.
RATE = 24_000
NAME = "tiny-speaking"


@contextmanager
def speaking_server(model: Path, *, engine_name: str = "transformers", **server: Any) -> Iterator[RunningServer]:
    """The speaking checkpoint served with ``server``'s fields (``ServerConfig``), stopped on leaving.

    One compute thread each for the engine and the talker: on a busy 2-core machine two OpenMP threads wait on
    each other (10x slower)."""
    srv = start_server(
        model, name=NAME, engine_name=engine_name, engine={"max_model_len": 2048, "threads": 1}, server=server
    )
    try:
        yield srv
    finally:
        srv.stop()


def decode_audio(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Samples and the rate they were encoded at, read back with soundfile (wav, flac), numpy (raw 16-bit pcm,
    ``pcm`` from /v1/audio/speech and ``pcm16`` from chat) or PyAV (mp3, aac, opus)."""
    if fmt in ("pcm", "pcm16"):
        assert len(data) % 2 == 0
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, RATE
    if fmt in ("wav", "flac"):
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
        return samples, rate
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
        rate = stream.codec_context.sample_rate
    if fmt == "opus":  # Opus always decodes at 48 kHz; the encoded rate is in the OpusHead (bytes 12..16)
        assert rate == 48_000
        head = data.index(b"OpusHead")
        return samples[::2], int.from_bytes(data[head + 12 : head + 16], "little")
    return samples, rate


def refusal(call: Callable[[], Any]) -> openai.APIStatusError:
    """The error ``call`` is answered with, checked to be OpenAI's error object (no more, no fewer fields)."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return info.value
