"""What the video and audio decoders share about opening client bytes with PyAV safely.

FFmpeg can demux hundreds of formats, some of which open further resources by themselves (HLS and
DASH playlists, concat lists, QuickTime references). Client bytes are therefore opened with a
``format_whitelist`` naming only ordinary media containers, so a playlist that points at
``file:///etc/passwd`` or an internal URL is refused before any demuxer reads it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager

import av
import av.container
import av.stream

from omniserve.errors import MediaError

# Errors FFmpeg, PyAV and numpy raise on malformed input; each becomes a MediaError, never a 500.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    av.FFmpegError,
    OSError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)

# Declared durations are sometimes estimates (e.g. from the bit rate of raw AAC or MP3), so the
# fast refusal from metadata tolerates a small overshoot; the check while decoding is exact.
_ESTIMATE_TOLERANCE = 0.05
# Codecs add priming and padding samples (AAC adds ~20 ms), so decoded length may pass the
# declared one by a little without the file lying.
DECODE_SLACK_SECONDS = 0.1


@contextmanager
def open_input(
    data: bytes, demuxers: str, kind: str, accepted: str, param: str | None
) -> Iterator[av.container.InputContainer]:
    """Open ``data`` as a container whose demuxer is one of ``demuxers`` (FFmpeg names, comma-separated).

    ``kind`` ("video", "audio") and ``accepted`` (the formats in words) only word the error messages.
    """
    if not data:
        raise MediaError(f"The {kind} is empty (0 bytes).", param=param)
    try:
        container = av.open(
            io.BytesIO(data),
            mode="r",
            container_options={"format_whitelist": demuxers},
            metadata_errors="ignore",
        )
    except DECODE_ERRORS as exc:
        raise MediaError(
            f"Data is not a supported {kind} file ({describe(exc)}); accepted: {accepted}.", param=param
        ) from exc
    try:
        yield container
    finally:
        container.close()


def declared_seconds(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """The stream's duration from metadata, else the container's; None when neither says."""
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def start_seconds(stream: av.stream.Stream) -> float:
    """Streams may start at a non-zero timestamp (MPEG-TS, edit lists); sample times count from it."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def declared_over(declared: float, limit: float) -> bool:
    """Whether metadata alone proves the media too long (see _ESTIMATE_TOLERANCE)."""
    return math.isfinite(declared) and declared > limit * (1 + _ESTIMATE_TOLERANCE)


def describe(exc: BaseException) -> str:
    """FFmpeg messages name the BytesIO object as the 'file'; keep only the useful part."""
    strerror = getattr(exc, "strerror", None)
    return strerror if isinstance(strerror, str) and strerror else str(exc) or type(exc).__name__
