"""Decode client images with Pillow, refusing oversized ones from the header alone.

Pillow opens lazily: ``Image.open`` parses only the header, so the declared size can be checked
before a single pixel is decompressed. That is what makes a 30000x30000 PNG of a few hundred
bytes (a decompression bomb) cheap to refuse. Process-wide Pillow settings
(``Image.MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) are left untouched: other code in the
process may rely on them, and our own cap comes from ``MediaLimits``.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from omniserve.config import MediaLimits
from omniserve.errors import MediaError, MediaTooLarge
from omniserve.media.budget import DecodeControl, MediaPlan

# Formats a client may send. Pillow can open more (EPS runs Ghostscript, for one), and each extra
# parser is attack surface, so anything else is refused as "not a supported image".
_ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "AVIF")

_WHITE = (255, 255, 255)


def probe_image(
    data: bytes, limits: MediaLimits, *, param: str | None = None, control: DecodeControl | None = None
) -> MediaPlan:
    """The pixels ``decode_image`` will produce, from the header alone."""
    control = control or DecodeControl(limits, param=param, kind="image")
    with control.running(), _pillow_errors(limits, param):
        image = _open(data, param)
        _check_pixels(image.size, limits, param)
        return MediaPlan(pixels=image.width * image.height)


def decode_image(
    data: bytes, limits: MediaLimits, *, param: str | None = None, control: DecodeControl | None = None
) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image (first frame of animations).

    The pixels are charged to ``control``'s request budget from the header, before decompressing. Pillow
    decompresses in one call that cannot be interrupted, so the deadline is checked before and after it
    (the pixel caps bound how long it takes).
    """
    control = control or DecodeControl(limits, param=param, kind="image")
    with control.running(), _pillow_errors(limits, param):
        image = _open(data, param)
        _check_pixels(image.size, limits, param)
        declared = image.width * image.height
        control.charge_pixels(declared)
        control.check()
        _load(image, param)
        _check_pixels(image.size, limits, param)  # a few formats pick their final size while loading
        if image.width * image.height > declared:
            control.charge_pixels(image.width * image.height - declared)
        control.check()
        return _to_rgb(ImageOps.exif_transpose(image))


@contextmanager
def _pillow_errors(limits: MediaLimits, param: str | None) -> Iterator[None]:
    """Pillow's errors on malformed or oversized input, each as a MediaError (400), never a 500."""
    try:
        yield
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fired while parsing the header (its cap is global, ours per server).
        raise MediaTooLarge(
            f"Image is too large to decode ({exc}); the limit is {limits.max_image_pixels} pixels.", param=param
        ) from exc
    except (OSError, ValueError, SyntaxError, TypeError, EOFError, struct.error, MemoryError) as exc:
        # Pillow's plugins report malformed headers with any of these; none may escape as a 500.
        raise MediaError(f"Image could not be decoded: {exc}", param=param) from exc


def _open(data: bytes, param: str | None) -> Image.Image:
    """Parse the header only; Pillow's own bomb check (2x its global cap) raises here, before any decoding."""
    if not data:
        raise MediaError("Image is empty (0 bytes).", param=param)
    formats = _available_formats()
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as exc:
        raise MediaError(
            f"Data is not a supported image (accepted formats: {', '.join(sorted(formats))}).", param=param
        ) from exc


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can read (AVIF, for one, depends on how it was built)."""
    Image.init()
    return tuple(name for name in _ALLOWED_FORMATS if name in Image.OPEN)


def _check_pixels(size: tuple[int, int], limits: MediaLimits, param: str | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"Image declares an empty size ({width}x{height}).", param=param)
    if width * height > limits.max_image_pixels:
        raise MediaTooLarge(
            f"Image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels} pixels.",
            param=param,
        )


def _load(image: Image.Image, param: str | None) -> None:
    """Decompress now, inside our error handling, instead of lazily wherever the image is first used."""
    try:
        image.load()
    except OSError as exc:
        message = str(exc)
        if "truncated" in message or "broken data stream" in message:
            raise MediaError(f"Image data is truncated ({message}).", param=param) from exc
        raise MediaError(f"Image data is corrupt or truncated: {message}", param=param) from exc
    except (SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise MediaError(f"Image data is corrupt or truncated: {exc}", param=param) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as a viewer would show it, instead of letting convert() expose the
    arbitrary colour stored under fully transparent pixels; scale high-bit-depth greyscale first."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit_gray(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale (medical scans, depth maps) would clip to white under convert("RGB")."""
    array = np.asarray(image, dtype=np.float64)
    scale = 1.0 if image.mode == "F" else 257.0  # "I" from a 16-bit PNG holds 0..65535
    return Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"
