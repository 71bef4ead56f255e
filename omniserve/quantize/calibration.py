"""Calibration data: OpenAI-style conversations in JSONL, encoded by the same template layer as serving.

One JSON object per line with a ``messages`` list exactly as a client would send it to
``/v1/chat/completions`` (other keys are ignored, so dataset rows with ids or labels can be used as
they are). Media parts name files relative to the JSONL file (or absolute paths, ``file://`` URLs)
or carry ``data:`` URLs / ``input_audio`` base64; remote URLs are refused so a calibration run is
reproducible offline. A conversation ending with an assistant turn is encoded as a finished
exchange; otherwise the generation prompt is appended, as at serving time.

Encoding goes through ``to_hf_messages`` and ``PromptRenderer.render_chat``, so the token ids,
media placeholders and processed pixel/audio features are those the served model sees; images,
videos and audio then flow through the towers when the calibration forward runs.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from omniserve.config import MediaLimits
from omniserve.errors import InvalidRequest, MediaError
from omniserve.quantize.errors import CalibrationDataError
from omniserve.validation import describe_validation_error

if TYPE_CHECKING:
    from omniserve.media.loader import MediaItem, MediaSource
    from omniserve.protocol import ChatMessage
    from omniserve.templates.render import PromptRenderer


@dataclass(frozen=True)
class CalibrationSample:
    """One validated line of a calibration file (media not yet decoded)."""

    source: Path
    line: int
    messages: list[ChatMessage]
    modalities: frozenset[str]  # media kinds it uses: image, video, audio (empty for text-only)


@dataclass
class EncodedSample:
    """A sample as model inputs: token ids plus the processor's media tensors."""

    source: Path
    line: int
    token_ids: list[int]
    mm_inputs: dict[str, Any] = field(default_factory=dict)
    modalities: frozenset[str] = frozenset()

    def batch(self, device: Any = None, dtype: Any = None) -> dict[str, Any]:
        """Keyword arguments for one forward pass of the language model (batch of one).

        Floating media features are cast to the model's ``dtype`` as the engine does, except the
        video timing (seconds per grid), which positions need exact.
        """
        import torch

        ids = torch.tensor([self.token_ids], dtype=torch.long)
        out: dict[str, Any] = {}
        for key, value in {"input_ids": ids, "attention_mask": torch.ones_like(ids), **self.mm_inputs}.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device) if device is not None else value
                if dtype is not None and value.is_floating_point() and key != "video_second_per_grid":
                    value = value.to(dtype)
            out[key] = value
        return out


def read_calibration(path: Path) -> list[CalibrationSample]:
    """Parse and validate every line of ``path``; the first bad line raises with its number."""
    import pydantic

    from omniserve.protocol import ChatMessage
    from omniserve.templates.conversation import to_hf_messages

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"cannot read the calibration file: {exc}", source=path) from exc
    adapter = pydantic.TypeAdapter(list[ChatMessage])
    samples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise CalibrationDataError(f"not valid JSON: {exc}", source=path, line=number) from exc
        if not isinstance(row, dict) or "messages" not in row:
            raise CalibrationDataError(
                'each line must be a JSON object with a "messages" list', source=path, line=number
            )
        try:
            messages = adapter.validate_python(row["messages"])
        except pydantic.ValidationError as exc:
            problem = describe_validation_error(exc, root="messages")
            raise CalibrationDataError(
                f"messages are not OpenAI chat messages: {problem.message}", source=path, line=number
            ) from exc
        if not messages:
            raise CalibrationDataError("messages is empty", source=path, line=number)
        _, sources = to_hf_messages(messages)
        samples.append(CalibrationSample(path, number, messages, frozenset(s.kind for s in sources)))
    if not samples:
        raise CalibrationDataError("the calibration file holds no samples", source=path)
    return samples


def usable(samples: Sequence[CalibrationSample], modalities: frozenset[str]) -> tuple[list[CalibrationSample], Counter]:
    """The samples whose media the model accepts, and a count of the others by the modality they lack.

    One calibration set serves text-only and multimodal models alike: an image sample is skipped
    (and counted in the report) for a model without a vision tower, never an error.
    """
    kept, skipped = [], Counter()
    for sample in samples:
        missing = sample.modalities - modalities
        if missing:
            skipped.update(sorted(missing))
        else:
            kept.append(sample)
    return kept, skipped


def encode(
    sample: CalibrationSample,
    renderer: PromptRenderer,
    *,
    max_length: int,
    limits: MediaLimits,
) -> EncodedSample:
    """Decode the sample's media and render it; text-only samples are cut to ``max_length`` tokens.

    A sample with media longer than ``max_length`` is an error: cutting it would split a media
    placeholder run from its features, and the processor output would no longer match.
    """
    from omniserve.templates.conversation import to_hf_messages

    hf_messages, sources = to_hf_messages(sample.messages)
    try:
        media = [_load(src, sample.source.parent, limits) for src in sources]
        rendered = renderer.render_chat(
            hf_messages, media, add_generation_prompt=sample.messages[-1].role != "assistant"
        )
    except (MediaError, InvalidRequest) as exc:
        where = f" ({exc.param})" if getattr(exc, "param", None) else ""
        raise CalibrationDataError(f"{exc.message}{where}", source=sample.source, line=sample.line) from exc
    ids = rendered.token_ids
    if not ids:
        raise CalibrationDataError("renders to zero tokens", source=sample.source, line=sample.line)
    if len(ids) > max_length:
        if media:
            raise CalibrationDataError(
                f"has {len(ids)} tokens with its media, over --max-length {max_length}; media cannot be cut: "
                "raise --max-length or use smaller media",
                source=sample.source,
                line=sample.line,
            )
        ids = ids[:max_length]
    return EncodedSample(sample.source, sample.line, list(ids), dict(rendered.mm_inputs), sample.modalities)


def _load(source: MediaSource, base: Path, limits: MediaLimits) -> MediaItem:
    from omniserve.media.audio import decode_audio
    from omniserve.media.image import decode_image
    from omniserve.media.loader import MediaItem
    from omniserve.media.video import decode_video

    data = _media_bytes(source, base)
    if not data:
        raise MediaError("the media is empty (0 bytes)", param=source.param)
    if source.kind == "image":
        return MediaItem("image", decode_image(data, limits, param=source.param))
    if source.kind == "video":
        return MediaItem("video", decode_video(data, limits, param=source.param))
    return MediaItem("audio", decode_audio(data, limits, format=source.audio_format, param=source.param))


def _media_bytes(source: MediaSource, base: Path) -> bytes:
    if source.inline_base64 is not None:
        return _b64(source.inline_base64, source.param)
    ref = (source.url or "").strip()
    parts = urlsplit(ref)
    scheme = parts.scheme.lower()
    if scheme == "data":
        header, comma, payload = ref[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise MediaError("data URLs must be base64: 'data:<mime>;base64,<data>'", param=source.param)
        return _b64(payload, source.param)
    if scheme == "file":
        file = Path(unquote(parts.path))
    elif scheme == "" or (len(scheme) == 1 and ref[1:3] in (":\\", ":/")):  # plain path (or a Windows drive)
        file = Path(ref)
    else:
        raise MediaError(
            f"calibration media must be files or data: URLs, not {scheme}:// (calibration runs offline)",
            param=source.param,
        )
    file = file if file.is_absolute() else base / file
    try:
        return file.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {file}: {exc.strerror or exc}", param=source.param) from exc


def _b64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"not valid base64: {exc}", param=param) from exc
