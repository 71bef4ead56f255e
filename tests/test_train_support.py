"""Helpers shared by the training, parity and synth tests (this module holds no tests itself).

``write_mixed_dataset`` writes a JSONL file covering every modality mix the issue names: text,
image, video, audio (file and inline), mixed, multi-turn, with and without a system prompt, and
media given as paths relative to the file as well as data URLs. ``with_chat_template`` copies a
checkpoint with another chat template, e.g. a published one from ``tests/fixtures/chat_templates``.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from tests.media_factory import audio_bytes, png_bytes, video_bytes


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def audio_part(url: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": url}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def write_media(folder: Path) -> None:
    """Small real files under ``folder/media``: a PNG, an MP4 (2 s) and a WAV (1 s)."""
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    (media / "red.png").write_bytes(png_bytes(64, 64))
    (media / "clip.mp4").write_bytes(video_bytes("mp4", seconds=2, fps=4))
    (media / "tone.wav").write_bytes(audio_bytes("wav", 1.0, sample_rate=16_000))


MIXED_CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "text": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ],
    "text+system+multi-turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ],
    "image": [
        {"role": "user", "content": [image_part("media/red.png"), text("What colour is this?")]},
        {"role": "assistant", "content": "red"},
    ],
    "image-data-url": [
        {"role": "user", "content": [text("Colour?"), image_part(data_url("image/png", png_bytes(56, 84)))]},
        {"role": "assistant", "content": "red"},
    ],
    "video+developer": [
        {"role": "developer", "content": "You watch clips."},
        {"role": "user", "content": [video_part("media/clip.mp4"), text("Which way does it move?")]},
        {"role": "assistant", "content": "right"},
    ],
    "audio-file": [
        {"role": "user", "content": [audio_part("media/tone.wav"), text("High or low?")]},
        {"role": "assistant", "content": "low"},
    ],
    "audio-inline": [
        {
            "role": "user",
            "content": [
                {
                    "type": "input_audio",
                    "input_audio": {
                        "data": base64.b64encode(audio_bytes("wav", 0.5, sample_rate=16_000)).decode(),
                        "format": "wav",
                    },
                },
                text("High or low?"),
            ],
        },
        {"role": "assistant", "content": "low"},
    ],
    "mixed+system": [
        {"role": "system", "content": "You see and hear."},
        {
            "role": "user",
            "content": [
                image_part("media/red.png"),
                video_part("media/clip.mp4"),
                audio_part("media/tone.wav"),
                text("Describe all three."),
            ],
        },
        {"role": "assistant", "content": "a red picture, a moving square and a tone"},
    ],
    "multi-turn-media": [
        {"role": "user", "content": [image_part("media/red.png"), text("Colour?")]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [audio_part("media/tone.wav"), text("And this sound?")]},
        {"role": "assistant", "content": "a low tone"},
        {"role": "user", "content": "Thanks."},
    ],
}


def write_jsonl(path: Path, conversations: list[list[dict[str, Any]]] | list[dict[str, Any]]) -> Path:
    lines = [json.dumps(c if isinstance(c, dict) else {"messages": c}) for c in conversations]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_mixed_dataset(folder: Path) -> Path:
    """Media files plus ``data.jsonl`` with every conversation of ``MIXED_CONVERSATIONS``."""
    write_media(folder)
    return write_jsonl(folder / "data.jsonl", list(MIXED_CONVERSATIONS.values()))


#: Published chat templates, verbatim (sources and licences in the folder's README.md).
CHAT_TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"


def published_template(name: str) -> str:
    """The text of ``tests/fixtures/chat_templates/NAME.jinja``, byte for byte."""
    return (CHAT_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def with_chat_template(model: Path, output: Path, template: str) -> Path:
    """A copy of the checkpoint ``model`` at ``output`` whose chat template is ``template``.

    The tiny checkpoints keep their template only in ``chat_template.jinja`` (the file processors and
    tokenizers read first), so replacing that file is the whole swap.
    """
    shutil.copytree(model, output)
    assert not any("chat_template" in json.loads(f.read_text()) for f in output.glob("*_config.json"))
    (output / "chat_template.jinja").write_text(template, encoding="utf-8")
    return output


def run_cli(*args: str | Path) -> Any:
    """Run one of the training commands in-process, as the ``omniserve`` command line would."""
    from omniserve.train.cli import standalone_app

    return CliRunner().invoke(standalone_app(), [str(a) for a in args], catch_exceptions=False)
