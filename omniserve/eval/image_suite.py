"""The data of the ``image-mcq`` suite, drawn from a fixed seed so it can be rebuilt byte for byte.

Flat shapes in clean colours on a plain background: questions whose answer is in the pixels and
nowhere in the text, small enough (a few hundred bytes per PNG) to live in the repository. The
committed files under ``eval/image-mcq/`` are this function's output; a test rebuilds them and
compares, so the generator and the data cannot drift apart.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from omniserve.synth.media import COLOURS

#: Palette shared by every image: names a model can be asked about, far apart in RGB. The synthetic
#: training tasks' chromatic colours (same names, same RGB), the six the committed data was made with.
PALETTE: dict[str, tuple[int, int, int]] = {
    name: COLOURS[name] for name in ("red", "green", "blue", "yellow", "purple", "orange")
}
SHAPES = ("circle", "square", "triangle")
SIZE = 48


def build_image_suite(folder: Path, *, seed: int = 0, per_subset: int = 12) -> dict[str, int]:
    """Write ``colour_val.jsonl``, ``shape_val.jsonl`` and ``images/`` under ``folder``; return counts."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for subset in ("colour", "shape"):
        rows = []
        for index in range(per_subset):
            colour, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
            name = f"images/{subset}-{index:02d}.png"
            (folder / name).write_bytes(shape_png(colour, shape))
            if subset == "colour":
                right, pool, question = colour, list(PALETTE), "<image 1> What colour is the shape?"
            else:
                right, pool, question = shape, list(SHAPES), "<image 1> Which shape is drawn?"
            wrong = rng.sample([option for option in pool if option != right], k=min(3, len(pool) - 1))
            options = [right, *wrong]
            rng.shuffle(options)
            rows.append(
                {
                    "id": f"{subset}-{index:02d}",
                    "question": question,
                    "options": options,
                    "image_1": name,
                    "answer": "ABCD"[options.index(right)],
                }
            )
        (folder / f"{subset}_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        counts[subset] = len(rows)
    return counts


def shape_png(colour: str, shape: str) -> bytes:
    """One suite image as PNG bytes: a ``PALETTE`` colour ``shape`` on a light background (also bench traffic)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    fill, box = PALETTE[colour], (8, 8, SIZE - 8, SIZE - 8)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(SIZE // 2, 8), (SIZE - 8, SIZE - 8), (8, SIZE - 8)], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
