"""The built-in calibration set (``quantize/calibration/``), written by code so it can be regenerated.

Small on purpose (a few dozen conversations, media of a few KB): it makes ``omniserve quantize``
work out of the box and exercises every input path (text, image, video, audio, mixed), but a
production run should calibrate on traffic that looks like the model's real use (``--calibration``).

The layout interleaves modalities so the first few samples already include media (small
``--num-samples`` still send data through the towers), and ends with one sample of each kind: the
last lines are held out to measure fidelity. Files are byte-for-byte reproducible with the same
Pillow/FFmpeg/libsndfile versions (fixed content, no timestamps).

Regenerate with ``python -m omniserve.quantize.default_set quantize/calibration``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from omniserve.quantize.recipes import recipes_dir

DEFAULT_FILE = "default.jsonl"

# (user prompt, assistant answer) pairs: instructions, facts, code, arithmetic, a few languages.
_TEXT = [
    (
        "Explain in two sentences why the sky is blue.",
        "Sunlight scatters off air molecules, and shorter blue wavelengths scatter much more than red ones. "
        "That scattered blue light reaches our eyes from every direction of the sky.",
    ),
    (
        "Write a Python function that returns the n-th Fibonacci number.",
        "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    ),
    ("What is 17 multiplied by 23?", "17 x 23 = 391."),
    (
        "Translate to French: The meeting starts at nine tomorrow morning.",
        "La réunion commence demain matin à neuf heures.",
    ),
    (
        "Give three tips for writing clear emails.",
        "1. Put the request in the first line. 2. Keep one topic per email. 3. End with the next step and a date.",
    ),
    (
        "Summarize the plot of Romeo and Juliet in one paragraph.",
        "Two young lovers from feuding families in Verona marry in secret. A street fight leads to Romeo's "
        "banishment, a plan to reunite them goes wrong, and both die, which finally reconciles their families.",
    ),
    (
        "What does HTTP status code 429 mean?",
        "429 Too Many Requests: the client sent too many requests in a given time; retry after the delay "
        "given in the Retry-After header.",
    ),
    ("Solve for x: 3x + 7 = 22.", "3x = 15, so x = 5."),
    (
        "Write a haiku about autumn rain.",
        "Cold rain on red leaves\nthe gutter hums all night long\nmorning smells of earth",
    ),
    ("¿Cuál es la capital de Australia?", "La capital de Australia es Canberra."),
    (
        "List the planets of the solar system in order from the Sun.",
        "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune.",
    ),
    (
        "Explain what a hash table is to a beginner.",
        "A hash table stores values under keys. It turns each key into a number (its hash) that says where to "
        "put the value, so looking a key up later takes about the same time however many items are stored.",
    ),
    (
        "Write a SQL query that counts orders per customer.",
        "SELECT customer_id, COUNT(*) AS orders FROM orders GROUP BY customer_id ORDER BY orders DESC;",
    ),
    (
        "Was ist der Unterschied zwischen Wetter und Klima?",
        "Wetter beschreibt den Zustand der Atmosphäre über Stunden oder Tage, Klima das typische Wetter "
        "eines Ortes über Jahrzehnte.",
    ),
    ("Convert 100 degrees Fahrenheit to Celsius.", "(100 - 32) x 5/9 = 37.8 degrees Celsius."),
    ("Suggest a name for a bakery that sells sourdough bread.", "Rise & Crust."),
    (
        "What are the symptoms of dehydration?",
        "Thirst, dark urine, dry mouth, tiredness, dizziness and headache; severe cases need medical care.",
    ),
    ("Write a bash one-liner that counts lines in all .py files.", "find . -name '*.py' -print0 | xargs -0 wc -l"),
    ("日本の首都はどこですか？", "日本の首都は東京です。"),
    (
        "Why do we have leap years?",
        "A year is about 365.24 days long; adding a day every fourth year (with century exceptions) keeps "
        "the calendar aligned with the seasons.",
    ),
    (
        "Describe the water cycle briefly.",
        "Water evaporates, condenses into clouds, falls as precipitation and flows back to seas and lakes.",
    ),
    ("What is the derivative of x^3 + 2x?", "3x^2 + 2."),
    ("Give a short motivational quote.", "Small steps every day add up to big changes."),
]

_IMAGE = [
    ("What shapes and colours do you see in this image?", "A red circle on a white background beside a blue square."),
    ("Describe this picture.", "Horizontal stripes in green, yellow and purple."),
    ("What pattern is shown here?", "A black and white checkerboard."),
    ("Describe the gradient in this image.", "The colour fades from dark blue on the left to orange on the right."),
]
_VIDEO = [
    ("What happens in this video?", "A white square moves from left to right across a black background."),
    ("Describe the motion in this clip.", "A coloured bar slides down the frame while the background stays still."),
]
_AUDIO = [
    ("What do you hear in this recording?", "A steady tone at a single pitch."),
    ("Describe this sound.", "A tone that rises in pitch from low to high."),
]


def write_default_set(folder: Path) -> Path:
    """Write the JSONL file and its media into ``folder``; return the JSONL's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    media = {
        "image-circle.png": _png(_image_circle()),
        "image-stripes.png": _png(_image_stripes()),
        "image-checker.png": _png(_image_checker()),
        "image-gradient.png": _png(_image_gradient()),
        "video-square.mp4": _mp4(_frames_square()),
        "video-bar.mp4": _mp4(_frames_bar()),
        "audio-tone.flac": _flac(_tone(440.0, 440.0)),
        "audio-chirp.flac": _flac(_tone(220.0, 880.0)),
    }
    for name, data in media.items():
        (folder / name).write_bytes(data)
    rows = _rows(list(media))
    jsonl = folder / DEFAULT_FILE
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return jsonl


def default_calibration_file() -> Path:
    return recipes_dir() / "calibration" / DEFAULT_FILE


def _chat(user: Any, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _rows(names: list[str]) -> list[dict[str, Any]]:
    images = [n for n in names if n.startswith("image-")]
    videos = [n for n in names if n.startswith("video-")]
    audios = [n for n in names if n.startswith("audio-")]

    def image(i: int) -> dict[str, Any]:
        prompt, answer = _IMAGE[i]
        return _chat([{"type": "image_url", "image_url": {"url": images[i]}}, {"type": "text", "text": prompt}], answer)

    def video(i: int) -> dict[str, Any]:
        prompt, answer = _VIDEO[i]
        return _chat([{"type": "video_url", "video_url": {"url": videos[i]}}, {"type": "text", "text": prompt}], answer)

    def audio(i: int) -> dict[str, Any]:
        prompt, answer = _AUDIO[i]
        return _chat([{"type": "audio_url", "audio_url": {"url": audios[i]}}, {"type": "text", "text": prompt}], answer)

    text = [_chat(q, a) for q, a in _TEXT]
    mixed = _chat(
        [
            {"type": "text", "text": "Compare the picture with the sound."},
            {"type": "image_url", "image_url": {"url": images[2]}},
            {"type": "audio_url", "audio_url": {"url": audios[1]}},
        ],
        "The picture is a static checkerboard; the sound is a tone rising in pitch.",
    )
    system = {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name a primary colour."},
        ]
    }
    # Interleaved so any prefix mixes modalities; the last four lines (one per kind) are what the
    # default --fidelity-samples holds out of calibration to measure fidelity.
    body = [
        text[0],
        image(0),
        text[1],
        audio(0),
        text[2],
        video(0),
        text[3],
        mixed,
        text[4],
        image(1),
        text[5],
        text[6],
        system,
        text[7],
        text[8],
        image(2),
        text[9],
        text[10],
        text[11],
        text[12],
        text[13],
        text[14],
        text[15],
        text[16],
        text[17],
        text[18],
        text[19],
        text[20],
        text[21],
    ]
    held_out = [text[22], image(3), audio(1), video(1)]
    return body + held_out


# ----------------------------------------------------------------- media, small and deterministic


def _canvas(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (255, 255, 255)) -> Any:
    import numpy as np

    return np.full((height, width, 3), colour, dtype=np.uint8)


def _image_circle() -> Any:
    import numpy as np

    img = _canvas()
    yy, xx = np.mgrid[0:64, 0:64]
    img[(yy - 32) ** 2 + (xx - 20) ** 2 < 14**2] = (220, 30, 30)
    img[20:44, 40:60] = (30, 60, 220)
    return img


def _image_stripes() -> Any:
    img = _canvas()
    for i, colour in enumerate([(40, 170, 60), (240, 210, 40), (130, 50, 160)]):
        img[i * 21 : (i + 1) * 21 + (1 if i == 2 else 0)] = colour
    return img


def _image_checker() -> Any:
    import numpy as np

    yy, xx = np.mgrid[0:64, 0:64]
    cells = ((yy // 8 + xx // 8) % 2).astype(np.uint8) * 255
    return np.repeat(cells[:, :, None], 3, axis=2)


def _image_gradient() -> Any:
    import numpy as np

    t = np.linspace(0.0, 1.0, 64)[None, :, None]
    left, right = np.array([20, 30, 120]), np.array([250, 140, 30])
    return np.broadcast_to(left + (right - left) * t, (64, 64, 3)).round().astype(np.uint8)


def _frames_square() -> Any:
    import numpy as np

    frames = np.zeros((8, 64, 64, 3), dtype=np.uint8)
    for i in range(8):
        frames[i, 24:40, i * 6 : i * 6 + 16] = 255
    return frames


def _frames_bar() -> Any:
    import numpy as np

    frames = np.full((8, 64, 64, 3), (20, 90, 40), dtype=np.uint8)
    for i in range(8):
        frames[i, i * 7 : i * 7 + 8, :] = (250, 200, 60)
    return frames


def _tone(start_hz: float, end_hz: float, seconds: float = 1.0, rate: int = 16_000) -> Any:
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (start_hz * t + (end_hz - start_hz) * t**2 / (2 * seconds))
    return (0.4 * np.sin(phase)).astype(np.float32)


def _png(array: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _mp4(frames: Any, fps: int = 4) -> bytes:
    """H.264 in MP4 at 4 fps (2 s): decoded at the default 2 fps it gives 4 frames, 2 temporal patches."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as output:
        stream = output.add_stream("libx264", rate=fps, options={"crf": "30", "preset": "medium", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for array in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()


def _flac(samples: Any, rate: int = 16_000) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else recipes_dir() / "calibration"
    print(write_default_set(target))
