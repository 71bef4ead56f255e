"""Image, video and audio decoders on media generated here: what they return and what they refuse."""

from __future__ import annotations

import io
import struct
import time
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

import omniserve.media.audio as audio_module
import omniserve.media.video as video_module
from omniserve.config import MediaLimits
from omniserve.errors import MediaBudgetExceeded, MediaDecodeTimeout, MediaError, MediaTooLarge
from omniserve.media import SUPPORTED_AUDIO_FORMATS, decode_audio, decode_image, decode_video
from omniserve.media.audio import probe_audio
from omniserve.media.budget import DecodeControl, RequestBudget
from omniserve.media.image import probe_image
from omniserve.media.video import probe_video
from tests.media_factory import (
    animated_gif_bytes,
    audio_bytes,
    image_bytes,
    jpeg_bytes,
    png_bytes,
    png_with_declared_size,
    video_bytes,
)

PARAM = "messages[0].content[0]"
LIMITS = MediaLimits()
GARBAGE = np.random.default_rng(0).bytes(4096)


def refused(error: type[MediaError], decode: Any, data: bytes, *args: Any, **kwargs: Any) -> MediaError:
    """Assert ``decode`` refuses ``data`` with exactly this error family, quickly, naming the param."""
    started = time.monotonic()
    with pytest.raises(error) as info:
        decode(data, *args, param=PARAM, **kwargs)
    assert time.monotonic() - started < 1.0
    assert info.value.param == PARAM
    if error is MediaError:
        assert not isinstance(info.value, MediaTooLarge)
    return info.value


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_image_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(image_bytes(fmt, 64, 48), LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)
    bottom_right = np.asarray(image)[-1, -1].astype(int)
    assert np.abs(bottom_right - (200, 30, 30)).max() <= 8  # lossy formats move colours a little
    assert np.asarray(image)[0, 0].max() <= 8  # the dark quadrant


def test_image_modes_become_rgb() -> None:
    assert decode_image(image_bytes("PNG", mode="L"), LIMITS).getpixel((63, 47)) == (200, 200, 200)
    transparent = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(transparent, "PNG")
    assert decode_image(transparent.getvalue(), LIMITS).getpixel((0, 0)) == (255, 255, 255)
    deep = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(deep, "PNG")
    gray = decode_image(deep.getvalue(), LIMITS)
    assert gray.getpixel((0, 0)) == (0, 0, 0) and 120 <= gray.getpixel((0, 32))[0] <= 135  # scaled, not clipped


def test_animated_image_keeps_first_frame() -> None:
    image = decode_image(animated_gif_bytes(), LIMITS)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 0, 0)


def test_decoded_image_is_loaded() -> None:
    image = decode_image(png_bytes(), LIMITS)
    assert image.im is not None  # no lazy decoding left for the caller to trip over


def test_decompression_bomb_refused_from_header() -> None:
    bomb = png_with_declared_size(30000, 30000)  # 900 Mpixels declared in ~100 bytes
    assert len(bomb) < 1000
    assert "40000000" in refused(MediaTooLarge, decode_image, bomb, LIMITS).message
    # Above Pillow's own (global) guard too: still our error, never Pillow's exception.
    refused(MediaTooLarge, decode_image, bomb, MediaLimits(max_image_pixels=10**10))
    # Under Pillow's guard but over ours: a header-only check, since loading this file would fail as truncated.
    error = refused(
        MediaTooLarge, decode_image, png_with_declared_size(3000, 3000), MediaLimits(max_image_pixels=10**6)
    )
    assert "3000x3000" in error.message and "1000000" in error.message


def test_real_image_over_pixel_limit_refused() -> None:
    refused(MediaTooLarge, decode_image, png_bytes(400, 300), MediaLimits(max_image_pixels=100_000))
    assert decode_image(png_bytes(400, 250), MediaLimits(max_image_pixels=100_000)).size == (400, 250)


@pytest.mark.parametrize("encode", [png_bytes, jpeg_bytes], ids=["png", "jpeg"])
def test_truncated_image_refused(encode: Any) -> None:
    data = encode(256, 256)
    assert "truncated" in refused(MediaError, decode_image, data[: len(data) // 2], LIMITS).message
    refused(MediaError, decode_image, data[:40], LIMITS)


def test_non_images_refused() -> None:
    for data in (GARBAGE, b"", b"<html>not an image</html>", audio_bytes("wav", 0.1)):
        refused(MediaError, decode_image, data, LIMITS)
    eps = io.BytesIO()
    Image.new("RGB", (8, 8)).save(eps, "EPS")  # Pillow would run Ghostscript to load it
    assert "not a supported image" in refused(MediaError, decode_image, eps.getvalue(), LIMITS).message


# --- videos -----------------------------------------------------------------------------------

VIDEO_LIMITS = MediaLimits(video_fps=10, max_video_frames=32)


def square_x(frame: np.ndarray) -> float:
    """Mean column of the bright square, which moves 2 px per source frame (media_factory)."""
    columns = np.nonzero(frame.mean(axis=2).max(axis=0) > 128)[0]
    return float(columns.mean())


@pytest.mark.parametrize("container", ["mp4", "webm", "gif", "mov", "mkv", "avi", "ts"])
def test_video_sampled_by_timestamp(container: str) -> None:
    video = decode_video(video_bytes(container, seconds=2, fps=10), VIDEO_LIMITS, fps=2)
    assert video.frames.shape == (4, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == 2.0 and video.duration == pytest.approx(2.0, abs=0.05)
    assert video.timestamps == pytest.approx((0.0, 0.5, 1.0, 1.5))
    # Frame k is the source frame at k/2 s: source frame 5k, whose square sits 10k px further right.
    positions = [square_x(frame) for frame in video.frames]
    assert np.diff(positions) == pytest.approx([10, 10, 10], abs=1.5)


def test_video_default_rate_comes_from_limits() -> None:
    video = decode_video(video_bytes("mp4", seconds=2, fps=10), MediaLimits(video_fps=1.5))
    assert len(video.frames) == 3 and video.fps == 1.5


def test_video_max_frames_lowers_the_rate_evenly() -> None:
    video = decode_video(video_bytes("mp4", seconds=2, fps=10), VIDEO_LIMITS, fps=10, max_frames=5)
    assert len(video.frames) == 5 and video.fps == pytest.approx(2.5)
    assert video.timestamps == pytest.approx((0.0, 0.4, 0.8, 1.2, 1.6))
    assert all(b > a for a, b in zip(video.timestamps, video.timestamps[1:], strict=False))
    capped = decode_video(video_bytes("webm", seconds=3, fps=10), MediaLimits(video_fps=10, max_video_frames=6))
    assert len(capped.frames) == 6 and capped.fps == pytest.approx(2.0)


def test_short_video_gives_one_frame() -> None:
    video = decode_video(video_bytes("mp4", seconds=0.2, fps=10), VIDEO_LIMITS, fps=1)
    assert video.frames.shape[0] == 1 and video.timestamps == (0.0,)


def test_video_without_duration_metadata_is_measured() -> None:
    data = video_bytes("webm", seconds=3, fps=10, streamed=True)  # as a browser's MediaRecorder writes it
    video = decode_video(data, VIDEO_LIMITS, fps=2)
    assert len(video.frames) == 6 and video.duration == pytest.approx(3.0, abs=0.11)
    refused(MediaTooLarge, decode_video, data, MediaLimits(max_video_seconds=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fps": 11}, "over this server's limit of 10"),
        ({"fps": 0}, "positive"),
        ({"fps": float("nan")}, "positive"),
        ({"max_frames": 33}, "over this server's limit of 32"),
        ({"max_frames": 0}, "positive"),
    ],
)
def test_video_request_options_within_caps(kwargs: dict[str, Any], message: str) -> None:
    error = refused(MediaError, decode_video, video_bytes("mp4", 1, 10), VIDEO_LIMITS, **kwargs)
    assert message in error.message


def test_video_over_duration_refused_fast() -> None:
    data = video_bytes("mp4", seconds=3, fps=10)
    assert "limit of 2 s" in refused(MediaTooLarge, decode_video, data, MediaLimits(max_video_seconds=2)).message


def test_video_over_pixel_limit_refused() -> None:
    data = video_bytes("mp4", seconds=1, fps=10, width=64, height=64)
    assert "64x64" in refused(MediaTooLarge, decode_video, data, MediaLimits(max_video_pixels=64 * 63)).message


def test_video_duration_enforced_without_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata may be absent or lie; the limit holds on what demuxing and decoding find."""
    monkeypatch.setattr(video_module, "declared_seconds", lambda container, stream: None)
    data = video_bytes("mp4", seconds=3, fps=10)
    refused(MediaTooLarge, decode_video, data, MediaLimits(max_video_seconds=2))
    assert len(decode_video(data, VIDEO_LIMITS, fps=2).frames) == 6


def test_not_a_video_refused() -> None:
    for data in (GARBAGE, b"", png_bytes(), b"<html></html>"):
        refused(MediaError, decode_video, data, LIMITS)
    assert "no video stream" in refused(MediaError, decode_video, audio_bytes("m4a", 0.5), LIMITS).message


def test_truncated_video_refused() -> None:
    mp4 = video_bytes("mp4", seconds=2, fps=10)  # index at the end: nothing decodable without it
    refused(MediaError, decode_video, mp4[: len(mp4) // 2], LIMITS)
    webm = video_bytes("webm", seconds=2, fps=10)  # header says 2 s, frames stop early
    assert "truncated" in refused(MediaError, decode_video, webm[: len(webm) // 2], VIDEO_LIMITS).message


def test_playlists_are_not_followed() -> None:
    """HLS/concat demuxers would open the files and URLs a playlist names: only media containers are read."""
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    refused(MediaError, decode_video, playlist, LIMITS)
    refused(MediaError, decode_video, b"ffconcat version 1.0\nfile /etc/passwd\n", LIMITS)


# --- audio ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(SUPPORTED_AUDIO_FORMATS))
def test_audio_decodes_to_16k_mono(fmt: str) -> None:
    audio = decode_audio(audio_bytes(fmt, seconds=1.0), LIMITS, format=fmt)
    assert audio.sample_rate == 16_000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.duration == pytest.approx(1.0, abs=0.05)
    assert np.abs(audio.samples).max() <= 1.0
    assert np.sqrt(np.mean(audio.samples**2)) == pytest.approx(0.5 / np.sqrt(2), abs=0.03)  # the 0.5 tone


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a"])
def test_stereo_is_averaged_not_summed(fmt: str) -> None:
    audio = decode_audio(audio_bytes(fmt, seconds=1.0, channels=2), LIMITS)
    assert np.sqrt(np.mean(audio.samples**2)) == pytest.approx(0.5 / np.sqrt(2), abs=0.03)


def test_audio_sample_rate_comes_from_limits() -> None:
    audio = decode_audio(audio_bytes("wav", 1.0, sample_rate=8000), MediaLimits(audio_sample_rate=24_000))
    assert audio.sample_rate == 24_000 and len(audio.samples) == pytest.approx(24_000, abs=50)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_audio_over_duration_refused(fmt: str) -> None:
    error = refused(MediaTooLarge, decode_audio, audio_bytes(fmt, 3.0), MediaLimits(max_audio_seconds=1))
    assert "limit of 1 s" in error.message


def test_audio_duration_enforced_while_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_module, "declared_seconds", lambda container, stream: None)
    refused(MediaTooLarge, decode_audio, audio_bytes("mp3", 3.0), MediaLimits(max_audio_seconds=1))


def test_audio_format_name_checked() -> None:
    error = refused(MediaError, decode_audio, audio_bytes("wav", 0.5), LIMITS, format="pcm16")
    assert "'pcm16'" in error.message and "wav" in error.message and "mp3" in error.message
    assert decode_audio(audio_bytes("wav", 0.5), LIMITS, format="WAV").duration == pytest.approx(0.5, abs=0.01)
    # The name is a label: the bytes decide how they are decoded.
    assert decode_audio(audio_bytes("wav", 0.5), LIMITS, format="mp3").duration == pytest.approx(0.5, abs=0.01)


def test_not_audio_refused() -> None:
    for data in (GARBAGE, b"", png_bytes(), b"RIFF\x00\x00\x00\x00WAVE"):
        refused(MediaError, decode_audio, data, LIMITS)
    assert "no audio stream" in refused(MediaError, decode_audio, video_bytes("mp4", 1, 10), LIMITS).message


@pytest.mark.parametrize(("fmt", "keep"), [("wav", 30), ("flac", 0.5), ("m4a", 0.5), ("ogg", 0.5), ("mp3", 60)])
def test_truncated_audio_refused(fmt: str, keep: float) -> None:
    data = audio_bytes(fmt, 1.0)
    refused(MediaError, decode_audio, data[: int(keep if keep > 1 else len(data) * keep)], LIMITS)


def test_wav_header_lying_about_length() -> None:
    """A data chunk size larger than the file (or the 0xFFFFFFFF of streaming writers) must not matter:
    the samples that are there get decoded, and the limit applies to them."""
    data = bytearray(audio_bytes("wav", 1.0, sample_rate=16_000))
    chunk = data.find(b"data")
    for claimed in (0xFFFFFFFF, 16_000 * 2 * 600):  # "unknown", and ten minutes
        data[chunk + 4 : chunk + 8] = struct.pack("<I", claimed)
        audio = decode_audio(bytes(data), MediaLimits(max_audio_seconds=5))
        assert audio.duration == pytest.approx(1.0, abs=0.01)


# --- deadlines, container limits and budgets (issue 12, items 2 and 8) --------------------------------


def _timed(decode: Any, *args: Any, **kwargs: Any) -> float:
    started = time.monotonic()
    decode(*args, **kwargs)
    return time.monotonic() - started


def test_video_decode_stops_at_its_deadline() -> None:
    """A long video (3,000 frames) with a deadline a tenth of its decoding time stops near the deadline."""
    data = video_bytes("avi", seconds=120, fps=25, width=160, height=120)
    limits = MediaLimits(max_video_seconds=600, video_fps=2, max_video_frames=240)
    whole = _timed(decode_video, data, limits)
    tight = limits.model_copy(update={"media_decode_timeout_seconds": whole / 10})
    started = time.monotonic()
    with pytest.raises(MediaDecodeTimeout) as info:
        decode_video(data, tight, param=PARAM)
    stopped = time.monotonic() - started
    assert info.value.param == PARAM and "--media-decode-timeout" in info.value.message
    assert f"{whole / 10:g} s" in info.value.message
    assert stopped < whole / 2, f"stopped after {stopped:.3f} s; the whole decode takes {whole:.3f} s"


def test_video_without_duration_is_measured_within_the_deadline() -> None:
    """The demuxing pass that measures a streamed file's duration is bounded by the same deadline."""
    data = video_bytes("mkv", seconds=120, fps=25, width=32, height=32, streamed=True)
    limits = MediaLimits(max_video_seconds=600, media_decode_timeout_seconds=0.002)
    with pytest.raises(MediaDecodeTimeout):
        decode_video(data, limits, param=PARAM)


def test_audio_decode_stops_at_its_deadline() -> None:
    data = audio_bytes("flac", seconds=240, sample_rate=16_000)
    limits = MediaLimits(max_audio_seconds=300)
    whole = _timed(decode_audio, data, limits)
    tight = limits.model_copy(update={"media_decode_timeout_seconds": whole / 10})
    started = time.monotonic()
    with pytest.raises(MediaDecodeTimeout, match="--media-decode-timeout"):
        decode_audio(data, tight, param=PARAM)
    assert time.monotonic() - started < whole / 2


def _video_with_streams(count: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as output:
        streams = [output.add_stream("mpeg4", rate=4) for _ in range(count)]
        for stream in streams:
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 40, dtype=np.uint8), format="rgb24")
            for stream in streams:
                output.mux(stream.encode(frame))
        for stream in streams:
            output.mux(stream.encode())
    return buffer.getvalue()


def test_containers_with_too_many_streams_are_refused() -> None:
    data = _video_with_streams(3)
    error = refused(MediaTooLarge, decode_video, data, MediaLimits(max_media_streams=2))
    assert "more than 2 streams" in error.message
    assert decode_video(data, MediaLimits(max_media_streams=3)).frames.shape[1:] == (32, 32, 3)


def test_containers_open_with_probe_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """FFmpeg's probesize / analyzeduration / max_streams come from MediaLimits, with an open timeout."""
    seen: list[dict[str, Any]] = []
    real_open = av.open

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real_open(*args, **kwargs)

    clip, video = audio_bytes("wav", 0.5), video_bytes("mp4", 1, 4)
    monkeypatch.setattr(av, "open", spy)
    limits = MediaLimits(media_probe_bytes=123_456, media_probe_seconds=2.5, max_media_streams=4)
    decode_audio(clip, limits)
    decode_video(video, limits)
    assert len(seen) == 2
    for kwargs in seen:
        options = kwargs["container_options"]
        assert (options["probesize"], options["analyzeduration"], options["max_streams"]) == ("123456", "2500000", "5")
        assert 0 < kwargs["timeout"][0] <= limits.media_decode_timeout_seconds


def test_decoders_charge_the_request_budget() -> None:
    """The decoders charge what they decode to the request's budget, so headers that lie cannot pass it."""
    limits = MediaLimits(max_pixels_per_request=10_000)
    control = DecodeControl(limits, param=PARAM, budget=RequestBudget(limits))
    decode_image(png_bytes(64, 64), limits, control=control)  # 4,096 pixels
    with pytest.raises(MediaBudgetExceeded, match="--max-pixels-per-request"):
        decode_video(video_bytes("mp4", 2, 4), limits, fps=2, control=control)  # 4 frames x 4,096 more
    audio_limits = MediaLimits(max_audio_seconds_per_request=1)
    control = DecodeControl(audio_limits, param=PARAM, budget=RequestBudget(audio_limits))
    with pytest.raises(MediaBudgetExceeded, match="--max-audio-seconds-per-request"):
        decode_audio(audio_bytes("wav", 3.0), audio_limits, control=control)


def test_probes_read_headers_only() -> None:
    assert probe_image(png_with_declared_size(3000, 2000), LIMITS).pixels == 6_000_000
    plan = probe_video(video_bytes("mp4", seconds=3, fps=10, width=64, height=48), VIDEO_LIMITS, fps=2)
    assert plan.pixels == 6 * 64 * 48, "the frames decode_video samples: 3 s at 2 fps"
    assert probe_video(video_bytes("webm", 3, 10, streamed=True), VIDEO_LIMITS).pixels == 32 * 64 * 64, "no duration"
    audio = probe_audio(audio_bytes("wav", 2.0), LIMITS)
    assert audio.audio_seconds == pytest.approx(2.0, abs=0.01) and audio.audio_bound_seconds > LIMITS.max_audio_seconds
