"""Decode client audio with PyAV into float32 mono at the model's sample rate.

One decoder (FFmpeg through PyAV) serves every format, so WAV, MP3, AAC and Opus go through the
same resampling and the same limits. FFmpeg also copes with WAV headers that lie about the data
length (it reads the data that is actually there). Channels are averaged into mono rather than
mixed by libswresample, whose stereo-to-mono matrix sums at -3 dB and can exceed full scale.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import av
import av.audio
import av.container
import numpy as np

from omniserve.config import MediaLimits
from omniserve.errors import MediaError, MediaTooLarge
from omniserve.media._pyav import (
    DECODE_SLACK_SECONDS,
    corrupt_as_media_error,
    declared_over,
    declared_seconds,
    decoded_frames,
    open_input,
)
from omniserve.media.budget import DecodeControl, MediaPlan

# The `format` names accepted in OpenAI `input_audio` parts; each one is decoded in the tests.
SUPPORTED_AUDIO_FORMATS: frozenset[str] = frozenset({"wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "aac"})

# FFmpeg demuxers behind those formats (m4a is "mov", webm is "matroska", raw AAC is "aac").
_AUDIO_DEMUXERS = "wav,mp3,flac,ogg,mov,matroska,aac"


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields explicitly
class DecodedAudio:
    samples: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def probe_audio(
    data: bytes,
    limits: MediaLimits,
    *,
    format: str | None = None,
    param: str | None = None,
    control: DecodeControl | None = None,
) -> MediaPlan:
    """The clip's declared length (0 when the header does not say) and the most it may decode to."""
    _check_format_name(format, param)
    control = control or DecodeControl(limits, param=param, kind="audio")
    with control.running(), corrupt_as_media_error("Audio", param), _open(data, limits, param, control) as container:
        declared = _declared(container, _audio_stream(container, param), limits, param)
    return MediaPlan(audio_seconds=declared or 0.0, audio_bound_seconds=limits.max_audio_seconds + DECODE_SLACK_SECONDS)


def decode_audio(
    data: bytes,
    limits: MediaLimits,
    *,
    format: str | None = None,
    param: str | None = None,
    control: DecodeControl | None = None,
) -> DecodedAudio:
    """Decode ``data`` to mono at ``limits.audio_sample_rate``.

    ``format`` is only checked against SUPPORTED_AUDIO_FORMATS: the container is detected from the
    bytes, so a client that labels an MP3 as "wav" still gets it decoded. ``control`` carries the
    item's deadline, cancellation and request budget (by default: the deadline of ``limits``, no budget).
    """
    _check_format_name(format, param)
    control = control or DecodeControl(limits, param=param, kind="audio")
    with control.running(), corrupt_as_media_error("Audio", param), _open(data, limits, param, control) as container:
        stream = _audio_stream(container, param)
        _declared(container, stream, limits, param)
        samples = _decode_mono(container, stream, limits, param, control)
    if samples.size == 0:
        raise MediaError("The audio has no decodable samples (empty or truncated).", param=param)
    return DecodedAudio(samples=samples, sample_rate=limits.audio_sample_rate)


def _open(
    data: bytes, limits: MediaLimits, param: str | None, control: DecodeControl
) -> AbstractContextManager[av.container.InputContainer]:
    accepted = ", ".join(sorted(SUPPORTED_AUDIO_FORMATS))
    return open_input(data, _AUDIO_DEMUXERS, "audio", accepted, param, limits, control)


def _declared(
    container: av.container.InputContainer, stream: av.audio.AudioStream, limits: MediaLimits, param: str | None
) -> float | None:
    """The declared length, refused at once when metadata alone proves the clip too long."""
    declared = declared_seconds(container, stream)
    if declared is not None and declared_over(declared, limits.max_audio_seconds):
        raise _too_long(declared, limits, param)
    return declared


def _check_format_name(format: str | None, param: str | None) -> None:
    if format is not None and format.lower() not in SUPPORTED_AUDIO_FORMATS:
        raise MediaError(
            f"Unsupported audio format {format!r}; supported: {', '.join(sorted(SUPPORTED_AUDIO_FORMATS))}.",
            param=param,
        )


def _audio_stream(container: av.container.InputContainer, param: str | None) -> av.audio.AudioStream:
    if not container.streams.audio:
        raise MediaError("The file has no audio stream.", param=param)
    return container.streams.audio[0]


def _decode_mono(
    container: av.container.InputContainer,
    stream: av.audio.AudioStream,
    limits: MediaLimits,
    param: str | None,
    control: DecodeControl,
) -> np.ndarray:
    """Decode, resample and average channels chunk by chunk, stopping as soon as the clip (or the request's
    audio, charged chunk by chunk) is too long."""
    rate = limits.audio_sample_rate
    max_samples = math.ceil((limits.max_audio_seconds + DECODE_SLACK_SECONDS) * rate)
    resampler = _Resampler(rate)
    chunks: list[np.ndarray] = []
    total = 0
    for frame in decoded_frames(container, stream, control):
        if not isinstance(frame, av.AudioFrame):
            continue
        for chunk in resampler.push(frame):
            chunks.append(chunk)
            total += chunk.size
            control.charge_audio_samples(chunk.size)
        if total > max_samples:
            raise _too_long(total / rate, limits, param)
    for chunk in resampler.flush():
        chunks.append(chunk)
        control.charge_audio_samples(chunk.size)
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    samples = np.concatenate(chunks)
    if samples.size > max_samples:
        raise _too_long(samples.size / rate, limits, param)
    return np.clip(samples, -1.0, 1.0, out=samples)


class _Resampler:
    """libswresample to float32 planar at the target rate, rebuilt if the input's layout or rate changes
    mid-stream (PyAV's resampler refuses frames unlike its first one; such streams exist, e.g. spliced MP3)."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._resampler: av.AudioResampler | None = None
        self._input: tuple[str, str, int] | None = None

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        out: list[np.ndarray] = []
        if self._resampler is None or shape != self._input:
            out = self.flush()
            self._resampler = av.AudioResampler(format="fltp", rate=self._rate)
            self._input = shape
        out.extend(_to_mono(resampled) for resampled in self._resampler.resample(frame))
        return out

    def flush(self) -> list[np.ndarray]:
        if self._resampler is None:
            return []
        return [_to_mono(resampled) for resampled in self._resampler.resample(None)]


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    planes = frame.to_ndarray()  # (channels, samples) float32, planar
    return planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0].astype(np.float32)


def _too_long(seconds: float, limits: MediaLimits, param: str | None) -> MediaTooLarge:
    return MediaTooLarge(
        f"Audio is {seconds:.1f} s long, over the limit of {limits.max_audio_seconds:g} s.", param=param
    )
