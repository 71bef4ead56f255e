"""Small media files generated in memory, so tests never download anything.

Every function returns the encoded bytes of one file. Videos show a white square moving across a
black background (so frames differ from one another); audio is a sine tone at half of full scale.
"""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy as np
import soundfile as sf
from PIL import Image

# container name -> (PyAV muxer, video codec, pixel format)
_VIDEO_CODECS: dict[str, tuple[str, str, str]] = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mov": ("mov", "libx264", "yuv420p"),
    "mkv": ("matroska", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx", "yuv420p"),
    "avi": ("avi", "mpeg4", "yuv420p"),
    "gif": ("gif", "gif", "rgb8"),
    "ts": ("mpegts", "mpeg2video", "yuv420p"),
}

# audio format name -> (PyAV muxer, codec) for the formats libsndfile cannot write
_AV_AUDIO_CODECS: dict[str, tuple[str, str]] = {
    "m4a": ("ipod", "aac"),
    "aac": ("adts", "aac"),
    "opus": ("ogg", "libopus"),
    "webm": ("webm", "libopus"),
}

# audio format name -> (libsndfile format, subtype)
_SF_AUDIO_FORMATS: dict[str, tuple[str, str | None]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", None),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}

VIDEO_CONTAINERS: tuple[str, ...] = tuple(_VIDEO_CODECS)
AUDIO_FORMATS: tuple[str, ...] = (*_SF_AUDIO_FORMATS, *_AV_AUDIO_CODECS)


def image_bytes(
    fmt: str = "PNG", width: int = 64, height: int = 48, mode: str = "RGB", color: tuple[int, ...] = (200, 30, 30)
) -> bytes:
    """An image of one colour with a black top-left quadrant, encoded with Pillow (``fmt``: PNG, JPEG...)."""
    image = Image.new(mode, (width, height), color[: len(mode)] if mode != "L" else color[0])
    image.paste(0 if mode == "L" else (0,) * len(mode), (0, 0, width // 2, height // 2))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    return image_bytes("PNG", width, height)


def jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    return image_bytes("JPEG", width, height)


def animated_gif_bytes(width: int = 32, height: int = 32, frames: int = 3) -> bytes:
    """A GIF whose first frame is red and later frames blue, to check which frame a decoder keeps."""
    images = [Image.new("RGB", (width, height), (255, 0, 0) if i == 0 else (0, 0, 255)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels: a decompression bomb's shape.

    Only one compressed row of data follows, so the file is a few hundred bytes whatever the size.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    row = zlib.compress(b"\x00" + b"\x00" * (3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def moving_square_frames(seconds: float, fps: float, width: int = 64, height: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a white square sliding right, one position per frame."""
    count = max(1, round(seconds * fps))
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    side = max(2, min(width, height) // 4)
    for index in range(count):
        x = (index * 2) % max(1, width - side)
        frames[index, height // 4 : height // 4 + side, x : x + side] = 255
    return frames


class _StreamSink(io.RawIOBase):
    """A write-only, non-seekable output: muxers cannot go back to fill in the duration, as when a
    browser's MediaRecorder streams a webm."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, chunk: bytes) -> int:  # type: ignore[override]
        self.data += bytes(chunk)
        return len(chunk)


def video_bytes(
    container: str = "mp4",
    seconds: float = 2.0,
    fps: int = 10,
    width: int = 64,
    height: int = 64,
    *,
    streamed: bool = False,
) -> bytes:
    """A ``seconds``-long clip at ``fps`` in ``container`` (one of VIDEO_CONTAINERS).

    ``streamed=True`` writes to a non-seekable sink; for mkv/webm the result has no duration metadata.
    """
    muxer, codec, pix_fmt = _VIDEO_CODECS[container]
    target: _StreamSink | io.BytesIO = _StreamSink() if streamed else io.BytesIO()
    with av.open(target, "w", format=muxer) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for array in moving_square_frames(seconds, fps, width, height):
            output.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        output.mux(stream.encode())
    return bytes(target.data) if isinstance(target, _StreamSink) else target.getvalue()


def tone(seconds: float, sample_rate: int, channels: int = 1, frequency: float = 440.0) -> np.ndarray:
    """A float32 sine at amplitude 0.5, shaped (samples,) for mono or (samples, channels)."""
    t = np.arange(round(seconds * sample_rate), dtype=np.float64) / sample_rate
    wave = (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return wave if channels == 1 else np.repeat(wave[:, None], channels, axis=1)


def audio_bytes(fmt: str = "wav", seconds: float = 1.0, sample_rate: int = 44_100, channels: int = 1) -> bytes:
    """A tone encoded as ``fmt`` (one of AUDIO_FORMATS): libsndfile where it can, PyAV otherwise."""
    if fmt in _SF_AUDIO_FORMATS:
        sf_format, subtype = _SF_AUDIO_FORMATS[fmt]
        buffer = io.BytesIO()
        sf.write(buffer, tone(seconds, sample_rate, channels), sample_rate, format=sf_format, subtype=subtype)
        return buffer.getvalue()
    return _av_audio_bytes(fmt, seconds, channels)


def _av_audio_bytes(fmt: str, seconds: float, channels: int) -> bytes:
    """AAC and Opus encoders want 48 kHz input here, so these formats are always written at 48 kHz."""
    muxer, codec = _AV_AUDIO_CODECS[fmt]
    rate = 48_000
    planar = tone(seconds, rate, channels).reshape(-1, channels).T
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as output:
        stream = output.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, planar.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + frame_size]), format="fltp", layout=stream.layout.name
            )
            frame.sample_rate, frame.pts = rate, start
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return buffer.getvalue()
