"""Decode client videos with PyAV into frames sampled at a fixed rate.

Models see a handful of frames per second, not every frame, so sampling is by timestamp: frame
``k`` is whatever the video shows at ``k / fps`` seconds. Limits are checked from metadata first
(fast refusal without decoding) and again while decoding, because metadata can be missing or lie.
Decoding is sequential and stops after the last needed timestamp; only the sampled frames are
converted to RGB, which is the expensive part for large frames. :func:`probe_video` tells from the
header alone how many pixels a video will decode to, so a request's budget is checked before decoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import av
import av.container
import av.stream
import av.video
import numpy as np

from omniserve.config import MediaLimits
from omniserve.errors import MediaError, MediaTooLarge
from omniserve.media._pyav import (
    corrupt_as_media_error,
    declared_seconds,
    decoded_frames,
    open_input,
    start_seconds,
)
from omniserve.media.budget import DecodeControl, MediaPlan

# FFmpeg demuxers accepted for video: mp4/mov/m4v/3gp, mkv/webm, gif, avi, MPEG-TS/PS, flv, ogg.
_VIDEO_DEMUXERS = "mov,matroska,gif,avi,mpegts,mpeg,flv,ogg"
_ACCEPTED = "mp4, mov, mkv, webm, gif, avi, MPEG-TS/PS, flv, ogg"

# Frames "at" a timestamp within this much count as showing it (timestamps are rationals turned into floats).
_EPSILON = 1e-6

# Frames may stop this much before the declared duration without the file counting as truncated.
_TRUNCATION_SLACK_SECONDS = 0.5
_TRUNCATION_SLACK_FRACTION = 0.1

# A sanity cap on how many frames one video may make us decode: a crafted file can pack millions of
# tiny frames into a short, small file. 240 frames per allowed second covers every real camera.
_MAX_DECODED_FRAMES_PER_SECOND = 240.0


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields explicitly
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float  # the sampling rate the frames correspond to
    timestamps: tuple[float, ...]  # seconds of each sampled frame, from the start of the video
    duration: float  # seconds of the source

    def metadata(self) -> dict[str, Any]:
        """The frames' timing as processors read it (transformers' ``VideoMetadata`` fields).

        The frames are already sampled, so ``frames_indices`` place each one on the ``fps`` grid the
        media layer sampled at; processors that write frame times into the prompt (Qwen3-VL's
        ``<t seconds>``) read them from here, and would otherwise assume 24 fps.
        """
        frames = len(self.frames)
        indices = (
            [round(t * self.fps) for t in self.timestamps] if len(self.timestamps) == frames else list(range(frames))
        )
        return {
            "total_num_frames": max(frames, round(self.duration * self.fps), max(indices, default=0) + 1),
            "fps": self.fps,
            "duration": self.duration,
            "frames_indices": indices,
            "video_backend": "omniserve",
        }


def probe_video(
    data: bytes,
    limits: MediaLimits,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    param: str | None = None,
    control: DecodeControl | None = None,
) -> MediaPlan:
    """The pixels ``decode_video`` will produce, from the header: sampled frames x frame size.

    Exact when the container declares its duration; otherwise the frame cap (an upper bound), since
    measuring the duration means demuxing the whole file.
    """
    rate = _requested_fps(fps, limits, param)
    cap = _requested_max_frames(max_frames, limits, param)
    control = control or DecodeControl(limits, param=param, kind="video")
    with control.running(), corrupt_as_media_error("Video", param), _open(data, limits, param, control) as container:
        stream = _video_stream(container, param)
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_frame_size(width, height, limits, param)
        if width <= 0 or height <= 0:
            raise MediaError("The video stream does not declare its frame size.", param=param)
        declared = declared_seconds(container, stream)
        if declared is not None and declared > limits.max_video_seconds:
            raise _too_long(declared, limits, param)
        frames = len(_plan(declared, rate, cap)[1]) if declared is not None else cap
        return MediaPlan(pixels=frames * width * height)


def decode_video(
    data: bytes,
    limits: MediaLimits,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    param: str | None = None,
    control: DecodeControl | None = None,
) -> DecodedVideo:
    """Sample ``data`` at ``fps`` (default ``limits.video_fps``), at most ``max_frames`` frames, spread evenly.

    ``control`` carries the item's deadline, cancellation and request budget (by default: the deadline
    of ``limits`` from now, no budget).
    """
    rate = _requested_fps(fps, limits, param)
    cap = _requested_max_frames(max_frames, limits, param)
    control = control or DecodeControl(limits, param=param, kind="video")
    with control.running(), corrupt_as_media_error("Video", param):
        with _open(data, limits, param, control) as container:
            stream = _video_stream(container, param)
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, limits, param)
            declared = declared_seconds(container, stream)
            if declared is not None:
                return _decode(container, stream, declared, rate, cap, limits, param, control)
            duration = _measure_duration(container, stream, limits, param, control)
        # Demuxing used up the first container; decode from a fresh one.
        with _open(data, limits, param, control) as container:
            return _decode(container, _video_stream(container, param), duration, rate, cap, limits, param, control)


def _open(
    data: bytes, limits: MediaLimits, param: str | None, control: DecodeControl
) -> AbstractContextManager[av.container.InputContainer]:
    return open_input(data, _VIDEO_DEMUXERS, "video", _ACCEPTED, param, limits, control)


def _decode(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    duration: float,
    rate: float,
    cap: int,
    limits: MediaLimits,
    param: str | None,
    control: DecodeControl,
) -> DecodedVideo:
    if duration > limits.max_video_seconds:
        raise _too_long(duration, limits, param)
    effective_fps, targets = _plan(duration, rate, cap)
    frames = _sample(container, stream, targets, limits, param, control)
    _check_not_truncated(targets, len(frames), duration, param)
    return DecodedVideo(frames=frames, fps=effective_fps, timestamps=tuple(targets[: len(frames)]), duration=duration)


def _requested_fps(fps: float | None, limits: MediaLimits, param: str | None) -> float:
    """Per-request rates may lower the server's, never raise it: decoding cost and prompt size grow with it."""
    if fps is None:
        return limits.video_fps
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"Video fps must be a positive number, got {fps!r}.", param=param)
    if fps > limits.video_fps:
        raise MediaError(f"Video fps {fps} is over this server's limit of {limits.video_fps}.", param=param)
    return float(fps)


def _requested_max_frames(max_frames: int | None, limits: MediaLimits, param: str | None) -> int:
    if max_frames is None:
        return limits.max_video_frames
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise MediaError(f"Video max_frames must be a positive integer, got {max_frames!r}.", param=param)
    if max_frames > limits.max_video_frames:
        raise MediaError(
            f"Video max_frames {max_frames} is over this server's limit of {limits.max_video_frames}.", param=param
        )
    return max_frames


def _video_stream(container: av.container.InputContainer, param: str | None) -> av.video.VideoStream:
    """The first real video stream; cover art in audio files shows up as a one-picture 'video' stream."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise MediaError("The file has no video stream.", param=param)


def _check_frame_size(width: int, height: int, limits: MediaLimits, param: str | None) -> None:
    if width * height > limits.max_video_pixels:
        raise MediaTooLarge(
            f"Video frames are {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_video_pixels} pixels.",
            param=param,
        )


def _measure_duration(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    limits: MediaLimits,
    param: str | None,
    control: DecodeControl,
) -> float:
    """Without metadata, the packets' timestamps give the duration; demuxing does not decode, so it is cheap."""
    start = start_seconds(stream)
    end = 0.0
    for packet in container.demux():  # every stream's packets, so the deadline is checked at each
        control.check()
        if packet.stream_index != stream.index:
            continue
        timestamp = packet.pts if packet.pts is not None else packet.dts
        if timestamp is None or packet.time_base is None:
            continue
        end = max(end, float((timestamp + (packet.duration or 0)) * packet.time_base) - start)
        if end > limits.max_video_seconds:
            raise _too_long(end, limits, param)
    return end


def _plan(duration: float, rate: float, cap: int) -> tuple[float, list[float]]:
    """Timestamps to sample: every 1/rate s over the clip, or ``cap`` of them spread evenly if that is more."""
    count = max(1, math.ceil(duration * rate - _EPSILON))
    if count <= cap:
        return rate, [index / rate for index in range(count)]
    effective = cap / duration
    return effective, [index / effective for index in range(cap)]


class _Picker:
    """Collects the RGB picture showing at each target time, converting each decoded frame at most once.

    The pictures go straight into one array sized for every target, allocated (and charged to the
    request's pixel budget) at the first frame: no list of frames stacked into a second copy at the end.
    """

    def __init__(self, targets: list[float], control: DecodeControl, param: str | None) -> None:
        self.targets = targets
        self.count = 0
        self._out: np.ndarray | None = None
        self._converted: tuple[av.VideoFrame, np.ndarray] | None = None
        self._control = control
        self._param = param

    @property
    def done(self) -> bool:
        return self.count == len(self.targets)

    @property
    def next_target(self) -> float:
        return self.targets[self.count]

    @property
    def frames(self) -> np.ndarray:
        """(count, H, W, 3) uint8: the pictures taken so far."""
        if self._out is None:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        return self._out if self.count == len(self._out) else self._out[: self.count]

    def take(self, frame: av.VideoFrame) -> None:
        if self._converted is None or self._converted[0] is not frame:
            self._converted = (frame, frame.to_ndarray(format="rgb24"))
        picture = self._converted[1]
        if self._out is None:
            self._control.charge_pixels(len(self.targets) * frame.width * frame.height)
            self._out = np.empty((len(self.targets), *picture.shape), dtype=np.uint8)
        elif picture.shape != self._out.shape[1:]:
            raise MediaError(
                f"Video frame size changes mid-stream (from {self._out.shape[2]}x{self._out.shape[1]} to "
                f"{frame.width}x{frame.height}); such videos are not supported.",
                param=self._param,
            )
        self._out[self.count] = picture
        self.count += 1


def _sample(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    targets: list[float],
    limits: MediaLimits,
    param: str | None,
    control: DecodeControl,
) -> np.ndarray:
    """Decode in order, keeping for each target the last frame that started at or before it."""
    stream.thread_type = "AUTO"
    start = start_seconds(stream)
    frame_step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    max_decoded = math.ceil(limits.max_video_seconds * _MAX_DECODED_FRAMES_PER_SECOND)
    picker = _Picker(targets, control, param)
    previous: av.VideoFrame | None = None
    previous_time = -frame_step
    for decoded, frame in enumerate(_video_frames(container, stream, control), start=1):
        time = frame.time - start if frame.time is not None else previous_time + frame_step
        _check_decoded(frame, time, decoded, max_decoded, limits, param)
        while not picker.done and time > picker.next_target + _EPSILON:
            picker.take(previous if previous is not None else frame)
        if not picker.done and time >= picker.next_target - _EPSILON:
            picker.take(frame)
        if picker.done:
            break
        previous, previous_time = frame, time
    if previous is not None and not picker.done:
        _finish(picker, previous, previous_time, frame_step)
    if not picker.count:
        raise MediaError("The video has no decodable frames (empty or truncated).", param=param)
    return picker.frames


def _video_frames(
    container: av.container.InputContainer, stream: av.video.VideoStream, control: DecodeControl
) -> Iterator[av.VideoFrame]:
    for frame in decoded_frames(container, stream, control):
        if isinstance(frame, av.VideoFrame):
            yield frame


def _finish(picker: _Picker, last: av.VideoFrame, last_time: float, frame_step: float) -> None:
    """At end of stream the last frame still shows until its own end; targets past that are dropped
    (metadata promised more video than the file holds) rather than filled with a frozen picture."""
    shown_for = float(last.duration * last.time_base) if last.duration and last.time_base else frame_step
    while not picker.done and (picker.next_target < last_time + shown_for - _EPSILON or not picker.count):
        picker.take(last)


def _check_not_truncated(targets: list[float], count: int, duration: float, param: str | None) -> None:
    """Frames ending well before the declared duration mean a cut-off upload, not a short clip: say so rather
    than answer about a fraction of the video. A small gap is normal (audio tracks outlasting the video)."""
    if count == len(targets):
        return
    covered = targets[count]  # the first time no frame showed
    if covered < duration - max(_TRUNCATION_SLACK_SECONDS, _TRUNCATION_SLACK_FRACTION * duration):
        raise MediaError(
            f"Video data looks truncated: its metadata declares {duration:.2f} s but frames stop "
            f"before {covered:.2f} s.",
            param=param,
        )


def _check_decoded(
    frame: av.VideoFrame, time: float, decoded: int, max_decoded: int, limits: MediaLimits, param: str | None
) -> None:
    """Limits again on what the decoder actually produced: metadata can be absent or false."""
    _check_frame_size(frame.width, frame.height, limits, param)
    if time > limits.max_video_seconds:
        raise _too_long(time, limits, param)
    if decoded > max_decoded:
        raise MediaTooLarge(
            f"Video has over {max_decoded} frames (more than {_MAX_DECODED_FRAMES_PER_SECOND:g} per second "
            f"of the {limits.max_video_seconds:g} s limit).",
            param=param,
        )


def _too_long(seconds: float, limits: MediaLimits, param: str | None) -> MediaTooLarge:
    return MediaTooLarge(
        f"Video is {seconds:.1f} s long, over the limit of {limits.max_video_seconds:g} s.", param=param
    )
