"""Encode synthetic scenes as the real files a user would send: PNG, MP4 (H.264) and WAV.

The tasks are learned from and evaluated on these files through the same decoders the server uses,
so a model trained on them has seen exactly the bytes-to-tensor path it is served with. Every
encoder is deterministic (no timestamps, single-threaded x264), so one seed gives the same bytes.
"""

from __future__ import annotations

import io

import numpy as np

#: Colour names and the RGB value each is drawn around (jittered per image).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
PITCHES: tuple[str, ...] = ("low", "high")
SAMPLE_RATE = 16_000
VIDEO_FPS = 2
VIDEO_FRAMES = 4
VIDEO_SIZE = 64


def image_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """PNG or JPEG of an (H, W, 3) uint8 array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    """H.264 MP4 of (T, H, W, 3) uint8 frames at ``fps``; near-lossless so colours survive yuv420p."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # threads=1: x264's output then depends on nothing but the frames and these options
        stream.codec_context.options = {"crf": "10", "preset": "veryfast", "threads": "1"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV of float samples in [-1, 1]."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# --------------------------------------------------------------------------- scenes


def colour_image(rng: np.random.Generator, colour: str) -> np.ndarray:
    """An image mostly of ``colour`` (32-320 px a side): jittered, noisy, with a few small patches of other colours.

    Sizes vary widely so the model sees from a handful to over a hundred image tokens, as user images give.
    """
    side = int(rng.integers(32, 321))
    aspect = float(rng.uniform(0.5, 2.0))
    height, width = max(32, int(side / aspect**0.5)), max(32, int(side * aspect**0.5))
    base = np.array(COLOURS[colour], dtype=np.int16) + rng.integers(-20, 21, size=3)
    image = np.broadcast_to(base, (height, width, 3)).copy()
    others = [name for name in COLOURS if name != colour]
    for _ in range(int(rng.integers(0, 3))):
        patch = np.array(COLOURS[others[int(rng.integers(len(others)))]], dtype=np.int16)
        ph, pw = int(rng.integers(height // 8, height // 4 + 1)), int(rng.integers(width // 8, width // 4 + 1))
        top, left = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
        image[top : top + ph, left : left + pw] = patch
    image += rng.integers(-15, 16, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def moving_bar(rng: np.random.Generator, direction: str) -> np.ndarray:
    """(T, H, W, 3) frames of a bright bar crossing a dark background in ``direction``.

    The bar spans the frame across the motion (a vertical bar moves left or right), so every row
    (or column) of the frame shows the motion; its axis gives away left/right versus up/down, and
    only the motion itself tells which of the two.
    """
    size = VIDEO_SIZE
    width = int(rng.integers(10, 17))
    step = int(rng.integers(9, 13))
    travel = step * (VIDEO_FRAMES - 1)
    sign = -1 if direction in ("left", "up") else 1
    start = int(rng.integers(travel if sign < 0 else 0, size - width - (travel if sign > 0 else 0) + 1))
    background = int(rng.integers(0, 50))
    colour = rng.integers(170, 256, size=3).astype(np.uint8)
    frames = np.full((VIDEO_FRAMES, size, size, 3), background, dtype=np.uint8)
    for t in range(VIDEO_FRAMES):
        at = start + sign * step * t
        if direction in ("left", "right"):
            frames[t, :, at : at + width] = colour
        else:
            frames[t, at : at + width, :] = colour
    return frames


def tone(rng: np.random.Generator, pitch: str) -> np.ndarray:
    """A sine tone, low (150-350 Hz) or high (1.2-2.5 kHz), 0.5-3 s, random level, faint noise."""
    frequency = rng.uniform(150, 350) if pitch == "low" else rng.uniform(1200, 2500)
    seconds = rng.uniform(0.5, 3.0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    samples = rng.uniform(0.2, 0.7) * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
    samples += rng.normal(0, 0.01, size=samples.shape)
    return np.clip(samples, -1, 1).astype(np.float32)
