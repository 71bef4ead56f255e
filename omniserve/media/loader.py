"""Turn the media references of one request into decoded media, concurrently and within limits.

Fetching is async (network); decoding is CPU work, so it runs in worker threads and the event
loop keeps serving /health and /metrics while a large video decodes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from omniserve.config import MediaLimits
from omniserve.errors import MediaError
from omniserve.media.audio import SUPPORTED_AUDIO_FORMATS, DecodedAudio, decode_audio
from omniserve.media.fetch import fetch_media_bytes
from omniserve.media.image import decode_image
from omniserve.media.video import DecodedVideo, decode_video

MediaKind = Literal["image", "video", "audio"]
MediaData = Image.Image | DecodedVideo | DecodedAudio


@dataclass(frozen=True)
class MediaSource:
    """Where one media item comes from: a URL (data:, http(s), file) or inline base64 audio."""

    kind: MediaKind
    param: str  # the request path of the part, for error messages, e.g. "messages[0].content[2]"
    url: str | None = None
    inline_base64: str | None = None
    audio_format: str | None = None


@dataclass(frozen=True)
class MediaItem:
    kind: MediaKind
    data: MediaData


@dataclass(frozen=True)
class MediaOptions:
    """Per-request processing choices; they may lower the server's caps, never raise them."""

    fps: float | None = None
    max_frames: int | None = None

    def check(self, limits: MediaLimits) -> MediaOptions:
        """Refuse up front (even when the request carries no video) rather than ignore a bad value."""
        if self.fps is not None and self.fps > limits.video_fps:
            raise MediaError(
                f"fps {self.fps} exceeds this server's video sampling cap of {limits.video_fps} fps",
                param="mm_processor_kwargs.fps",
            )
        if self.max_frames is not None and self.max_frames > limits.max_video_frames:
            raise MediaError(
                f"max_frames {self.max_frames} exceeds this server's cap of {limits.max_video_frames} frames",
                param="mm_processor_kwargs.max_frames",
            )
        return self


def check_audio_format(source: MediaSource) -> None:
    """Refuse an unknown format name before any bytes are decoded."""
    fmt = source.audio_format
    if fmt is not None and fmt.lower() not in SUPPORTED_AUDIO_FORMATS:
        raise MediaError(
            f"unsupported audio format {fmt!r}; supported: {', '.join(sorted(SUPPORTED_AUDIO_FORMATS))}",
            param=f"{source.param}.input_audio.format",
        )


async def _raw_bytes(source: MediaSource, limits: MediaLimits) -> bytes:
    if source.inline_base64 is not None:
        # input_audio carries bare base64; reuse the strict data-URL decoder and its size cap.
        return await fetch_media_bytes(
            f"data:application/octet-stream;base64,{source.inline_base64}", limits, param=source.param
        )
    assert source.url is not None
    return await fetch_media_bytes(source.url, limits, param=source.param)


async def load_one(source: MediaSource, limits: MediaLimits, options: MediaOptions) -> MediaItem:
    if source.kind == "audio":
        check_audio_format(source)
    data = await _raw_bytes(source, limits)
    if source.kind == "image":
        decoded: MediaData = await asyncio.to_thread(decode_image, data, limits, param=source.param)
    elif source.kind == "video":
        decoded = await asyncio.to_thread(
            decode_video, data, limits, fps=options.fps, max_frames=options.max_frames, param=source.param
        )
    else:
        decoded = await asyncio.to_thread(decode_audio, data, limits, format=source.audio_format, param=source.param)
    return MediaItem(kind=source.kind, data=decoded)


async def load_media(
    sources: list[MediaSource], limits: MediaLimits, options: MediaOptions | None = None
) -> list[MediaItem]:
    """Fetch and decode every item; the first failure cancels the rest and is raised."""
    if not sources:
        return []
    opts = options or MediaOptions()
    for source in sources:
        if source.kind == "audio":
            check_audio_format(source)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(load_one(s, limits, opts)) for s in sources]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [t.result() for t in tasks]
