"""What the video and audio decoders share about opening client bytes with PyAV safely.

FFmpeg can demux hundreds of formats, some of which open further resources by themselves (HLS and
DASH playlists, concat lists, QuickTime references). Client bytes are therefore opened with a
``format_whitelist`` naming only ordinary media containers, so a playlist that points at
``file:///etc/passwd`` or an internal URL is refused before any demuxer reads it.

Identifying a container's streams is bounded too (FFmpeg's probesize and analyzeduration, a number of
streams, the item's deadline while opening), and decoding checks the item's deadline and cancellation at
every packet (:func:`decoded_frames`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import av
import av.container
import av.frame
import av.stream

from omniserve.config import MediaLimits
from omniserve.errors import MediaError, MediaTooLarge

if TYPE_CHECKING:  # budget imports this module
    from omniserve.media.budget import DecodeControl

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
    data: bytes,
    demuxers: str,
    kind: str,
    accepted: str,
    param: str | None,
    limits: MediaLimits,
    control: DecodeControl,
) -> Iterator[av.container.InputContainer]:
    """Open ``data`` as a container whose demuxer is one of ``demuxers`` (FFmpeg names, comma-separated).

    ``kind`` ("video", "audio") and ``accepted`` (the formats in words) only word the error messages.
    FFmpeg reads at most ``media_probe_bytes`` / ``media_probe_seconds`` to find the streams and gives up
    when the item's deadline passes (PyAV's open timeout interrupts it); a container with more than
    ``max_media_streams`` streams is refused (FFmpeg stops creating them one past that).
    """
    if not data:
        raise MediaError(f"The {kind} is empty (0 bytes).", param=param)
    control.check()
    options = {
        "format_whitelist": demuxers,
        "probesize": str(limits.media_probe_bytes),
        "analyzeduration": str(round(limits.media_probe_seconds * 1_000_000)),
        "max_streams": str(limits.max_media_streams + 1),
    }
    try:
        container = av.open(
            io.BytesIO(data),
            mode="r",
            container_options=options,
            metadata_errors="ignore",
            timeout=(max(control.remaining(), 0.001), None),
        )
    except DECODE_ERRORS as exc:
        if control.expired():
            control.check()
        raise MediaError(
            f"Data is not a supported {kind} file ({describe(exc)}); accepted: {accepted}.", param=param
        ) from exc
    try:
        if len(container.streams) > limits.max_media_streams:
            raise MediaTooLarge(
                f"The {kind} file has more than {limits.max_media_streams} streams, this server's limit.", param=param
            )
        yield container
    finally:
        container.close()


def decoded_frames(
    container: av.container.InputContainer, stream: av.stream.Stream, control: DecodeControl
) -> Iterator[av.frame.Frame]:
    """``container.decode(stream)``, checking the item's deadline and cancellation at every packet.

    Packets of every stream pass through here (and those of other streams are dropped), so a file
    padded with packets of streams nobody decodes cannot keep FFmpeg demuxing past the deadline.
    """
    for packet in container.demux():
        control.check()
        if packet.stream_index == stream.index:
            yield from packet.decode()


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


@contextmanager
def corrupt_as_media_error(kind: str, param: str | None) -> Iterator[None]:
    """FFmpeg's and numpy's errors on malformed input become a MediaError (400) naming ``kind``, never a 500."""
    try:
        yield
    except MediaError:
        raise
    except DECODE_ERRORS as exc:
        raise MediaError(f"{kind} data is corrupt or truncated ({describe(exc)}).", param=param) from exc
