"""A waveform as the bytes of one of OpenAI's speech formats, with libraries only (no ffmpeg binary).

wav and flac through soundfile (libsndfile); mp3 (LAME), opus (libopus in Ogg) and aac (ffmpeg's
encoder in ADTS) through PyAV's bundled libraries; pcm is raw 16-bit little-endian mono at the
model's rate, as OpenAI defines it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
#: PyAV (container, codec, sample format the codec takes) per compressed format.
_PYAV = {"mp3": ("mp3", "libmp3lame", "fltp"), "opus": ("ogg", "libopus", "flt"), "aac": ("adts", "aac", "fltp")}
#: Bytes per chunk of a streamed body.
CHUNK_BYTES = 16 * 1024


def encode(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float32 ``samples`` in [-1, 1] as a whole file (or raw stream, for pcm) of format ``fmt``."""
    samples = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if fmt == "pcm":
        return (samples * 32767.0).round().astype("<i2").tobytes()
    if fmt in ("wav", "flac"):
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, samples, sample_rate, format=fmt.upper(), subtype="PCM_16")
        return buffer.getvalue()
    if fmt in _PYAV:
        return _encode_pyav(samples, sample_rate, *_PYAV[fmt])
    raise ValueError(f"unknown audio format {fmt!r}; expected one of {FORMATS}")


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes, for a body sent as it is written."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _encode_pyav(samples: np.ndarray, sample_rate: int, container_format: str, codec: str, sample_format: str) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format=sample_format, layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = 0
        for packet in stream.encode(frame):  # PyAV re-frames to the codec's frame size
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
