"""The requests ``omniserve bench`` sends: generated here (never a hub dataset) or read from the user's file.

EvalScope's perf tool would fetch its default datasets from ModelScope; omniserve always hands it a
local file. Two shapes are accepted, recognised from the first line:

- ``{"question": "..."}``: a text prompt (EvalScope's ``openqa`` reader);
- ``{"messages": [...]}``: full OpenAI messages, media inline (omniserve's ``omniserve_messages`` reader).

Synthetic load is deterministic (same index, same request), so two benchmark runs send the same bytes.
Multimodal shapes: one or several images per request (``--images N``: distinct pictures, as a
multi-image question sends), one audio clip, or one MP4 clip of ``--video-frames`` frames sent as a
``video_url`` part, the way users send video.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Literal

from omniserve.eval.errors import BenchError, DatasetMissing

Media = Literal["none", "image", "audio", "image+audio", "video"]
#: Frames per second of the generated clips: ``--video-frames 8`` is a 4-second clip.
VIDEO_FPS = 2
_TOPICS = ("the sea", "a mountain village", "a robot learning to paint", "the first snow", "a lost key", "a market")


def write_synthetic(path: Path, count: int, media: Media, *, images: int = 1, video_frames: int = 8) -> str:
    """Write ``count`` requests to ``path``; return the EvalScope perf dataset name that reads them.

    ``images`` pictures per request with image media (each different, so no cache can share them);
    ``video_frames`` frames in each request's clip with video media.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for index in range(count):
            prompt = f"Write a short story about {_TOPICS[index % len(_TOPICS)]} (number {index})."
            if media == "none":
                file.write(json.dumps({"question": prompt}) + "\n")
                continue
            parts: list[dict[str, object]] = []
            if "image" in media:
                for k in range(images):
                    parts.append({"type": "image_url", "image_url": {"url": _image_url(index * images + k)}})
            if media == "video":
                parts.append({"type": "video_url", "video_url": {"url": _video_url(index, video_frames)}})
            if "audio" in media:
                parts.append({"type": "input_audio", "input_audio": {"data": _wav_base64(index), "format": "wav"}})
            parts.append({"type": "text", "text": "Describe what you see and hear, then: " + prompt})
            file.write(json.dumps({"messages": [{"role": "user", "content": parts}]}) + "\n")
    return "openqa" if media == "none" else "omniserve_messages"


def inspect_file(path: Path) -> str:
    """The perf dataset name for a user's JSONL file, from its first non-empty line."""
    if not path.is_file():
        raise DatasetMissing(f"benchmark dataset {path} does not exist")
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                first = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{path} is not JSONL: first line: {exc}") from None
            if isinstance(first, dict) and "messages" in first:
                return "omniserve_messages"
            if isinstance(first, dict) and "question" in first:
                return "openqa"
            raise BenchError(f"{path}: each line needs a 'question' (text) or 'messages' (OpenAI messages) field")
    raise BenchError(f"{path} holds no requests")


def _image_url(index: int) -> str:
    from omniserve.eval.image_suite import PALETTE, SHAPES, shape_png

    colour = list(PALETTE)[index % len(PALETTE)]
    shape = SHAPES[index % len(SHAPES)]
    return "data:image/png;base64," + base64.b64encode(shape_png(colour, shape)).decode("ascii")


def _wav_base64(index: int, seconds: float = 1.0, rate: int = 16_000) -> str:
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    samples = 0.4 * np.sin(2 * np.pi * (220 + 40 * (index % 10)) * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _video_url(index: int, frames: int, side: int = 64) -> str:
    """An H.264 clip of ``frames`` frames: a square of the index's colour crossing a dark background."""
    import numpy as np

    from omniserve.eval.image_suite import PALETTE
    from omniserve.synth.media import mp4_bytes

    colour = list(PALETTE.values())[index % len(PALETTE)]
    clip = np.full((frames, side, side, 3), 16, dtype=np.uint8)
    for t in range(frames):
        left = (t * (side - 16)) // max(frames - 1, 1)
        clip[t, side // 2 - 8 : side // 2 + 8, left : left + 16] = colour
    return "data:video/mp4;base64," + base64.b64encode(mp4_bytes(clip, VIDEO_FPS)).decode("ascii")
