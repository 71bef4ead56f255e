"""Turn the media references of one request into decoded media, concurrently and within limits.

Fetching is async (network); decoding is CPU work, so it runs in worker threads and the event
loop keeps serving /health and /metrics while a large video decodes. The order is chosen so that
the cheap checks come first (see ``budget``): count the parts (nothing fetched yet), fetch, read
every header (nothing decoded yet) and check the request's budget, reserve the decoded bytes from the
process's gate, and only then decode, each item under a decode slot, a deadline and the request's
cancellation.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from PIL import Image

from omniserve.config import MediaLimits
from omniserve.errors import MediaError
from omniserve.media.audio import SUPPORTED_AUDIO_FORMATS, DecodedAudio, decode_audio, probe_audio
from omniserve.media.budget import DecodeControl, MediaGate, MediaPlan, RequestBudget, check_counts
from omniserve.media.fetch import fetch_media_bytes
from omniserve.media.image import decode_image, probe_image
from omniserve.media.video import DecodedVideo, decode_video, probe_video

T = TypeVar("T")

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


def _probe(
    source: MediaSource, data: bytes, limits: MediaLimits, options: MediaOptions, control: DecodeControl
) -> Callable[[], MediaPlan]:
    """Reading ``source``'s header, as work for a decode slot."""
    probe = {"image": probe_image, "video": probe_video, "audio": probe_audio}[source.kind]
    return functools.partial(probe, data, limits, **_options_for(source, options, control))


def _decoder(
    source: MediaSource, data: bytes, limits: MediaLimits, options: MediaOptions, control: DecodeControl
) -> Callable[[], MediaData]:
    """Decoding ``source``, as work for a decode slot."""
    decode = {"image": decode_image, "video": decode_video, "audio": decode_audio}[source.kind]
    return functools.partial(decode, data, limits, **_options_for(source, options, control))


def _options_for(source: MediaSource, options: MediaOptions, control: DecodeControl) -> dict[str, Any]:
    """The keyword arguments the probe and the decoder of ``source``'s kind take."""
    common: dict[str, Any] = {"param": source.param, "control": control}
    if source.kind == "video":
        return {**common, "fps": options.fps, "max_frames": options.max_frames}
    if source.kind == "audio":
        return {**common, "format": source.audio_format}
    return common


async def _all(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; the first failure cancels the rest (their threads stop) and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [task.result() for task in tasks]


@asynccontextmanager
async def loaded_media(
    sources: Sequence[MediaSource],
    limits: MediaLimits,
    options: MediaOptions | None = None,
    gate: MediaGate | None = None,
) -> AsyncIterator[list[MediaItem]]:
    """Fetch and decode every item; the decoded media count against ``gate`` until the block ends.

    ``gate`` is the app's (one per process); without one the call gets its own, so the per-request
    limits still hold for offline callers (training). End the block as soon as the media have been
    turned into the model's inputs.
    """
    if not sources:
        yield []
        return
    opts = options or MediaOptions()
    gate = gate or MediaGate(limits)
    check_counts(sources, limits)  # before anything is fetched
    for source in sources:
        if source.kind == "audio":
            check_audio_format(source)
    budget = RequestBudget(limits)
    controls = [DecodeControl(limits, param=s.param, kind=s.kind, budget=budget) for s in sources]
    data = await _all([_raw_bytes(source, limits) for source in sources])
    plans = await _all(
        [gate.run(_probe(s, d, limits, opts, c), c) for s, d, c in zip(sources, data, controls, strict=True)]
    )
    reserve = budget.plan(plans, [source.param for source in sources])  # refused here: nothing decoded yet
    async with gate.reserve(reserve):
        decoded = await _all(
            [gate.run(_decoder(s, d, limits, opts, c), c) for s, d, c in zip(sources, data, controls, strict=True)]
        )
        del data  # the encoded bytes are not needed any more; the decoded media are held until the block ends
        yield [MediaItem(kind=source.kind, data=item) for source, item in zip(sources, decoded, strict=True)]


async def load_media(
    sources: Sequence[MediaSource],
    limits: MediaLimits,
    options: MediaOptions | None = None,
    gate: MediaGate | None = None,
) -> list[MediaItem]:
    """``loaded_media`` for callers that keep the media afterwards: the gate's reservation ends on return."""
    async with loaded_media(sources, limits, options, gate) as media:
        return media
