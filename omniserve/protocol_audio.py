"""OpenAI's audio endpoints on the wire: transcriptions and translations (multipart in, JSON/text/subtitles out).

The request arrives as ``multipart/form-data``, not JSON, so ``TranscriptionRequest`` is built from the
form by ``from_form``; every refusal is still OpenAI's error object. The answers mirror the official
types (``openai.types.audio``): ``Transcription``/``Translation`` (json), their verbose forms, plain
text, SRT and WebVTT, and the streamed ``transcript.text.delta`` / ``transcript.text.done`` events.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omniserve.errors import InvalidRequest, UnsupportedParameter
from omniserve.validation import describe_validation_error

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]

#: File name endings OpenAI accepts, and the audio format name omniserve's decoder checks them as (the
#: container itself is detected from the bytes).
UPLOAD_FORMATS: dict[str, str] = {
    "flac": "flac",
    "mp3": "mp3",
    "mpga": "mp3",
    "mpeg": "mp3",
    "mp4": "m4a",
    "m4a": "m4a",
    "ogg": "ogg",
    "oga": "ogg",
    "opus": "opus",
    "wav": "wav",
    "webm": "webm",
}

#: Form fields OpenAI defines that this server does not implement: refused by name, never ignored.
_UNSUPPORTED_FIELDS = (
    "chunking_strategy",
    "include[]",
    "include",
    "known_speaker_names[]",
    "known_speaker_references[]",
)


class TranscriptionRequest(BaseModel):
    """One transcription (or translation) request, validated from its form fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: bytes = Field(repr=False)
    filename: str
    audio_format: str  # the decoder's name for the upload's format
    model: str = Field(min_length=1)
    language: str | None = Field(None, min_length=2, max_length=32)
    prompt: str | None = Field(None, max_length=4096)
    response_format: ResponseFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: tuple[Literal["segment", "word"], ...] = ()
    stream: bool = False
    n: int = 1  # one answer per upload; what the shared serving path reads

    @classmethod
    def from_form(cls, fields: dict[str, list[Any]], *, translation: bool) -> TranscriptionRequest:
        """Build from a parsed multipart form (field name -> values); a 400 naming the field otherwise."""
        for name in _UNSUPPORTED_FIELDS:
            if name in fields:
                raise UnsupportedParameter(f"{name.rstrip('[]')} is not supported by this server", param=name)
        allowed = {"file", "model", "prompt", "response_format", "temperature", "stream"}
        if not translation:
            allowed |= {"language", "timestamp_granularities[]", "timestamp_granularities"}
        for name, values in fields.items():
            if name not in allowed:
                raise InvalidRequest(f"unknown form field {name!r}", param=name, code="unknown_parameter")
            if len(values) > 1 and not name.startswith("timestamp_granularities"):
                raise InvalidRequest(f"form field {name!r} is given {len(values)} times", param=name)
        upload = fields.get("file", [None])[0]
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("file is required: the audio to transcribe, as a multipart file part", param="file")
        filename = upload.filename or ""
        payload: dict[str, Any] = {
            "file": upload.data,
            "filename": filename,
            "audio_format": _audio_format(filename),
            **{name: values[0] for name, values in fields.items() if name != "file" and values},
        }
        granularities = [*fields.get("timestamp_granularities[]", []), *fields.get("timestamp_granularities", [])]
        payload.pop("timestamp_granularities[]", None)
        payload["timestamp_granularities"] = tuple(granularities)
        if "stream" in payload:
            payload["stream"] = _form_bool(payload["stream"], "stream")
        try:
            request = cls.model_validate(payload)
        except ValidationError as exc:
            problem = describe_validation_error(exc)
            raise InvalidRequest(problem.message, param=problem.location) from None
        request.check()
        return request

    def check(self) -> None:
        if not self.file:
            raise InvalidRequest("the uploaded file is empty", param="file")
        if "word" in self.timestamp_granularities:
            raise UnsupportedParameter(
                "word timestamps are not available: the model reports no per-word timing",
                param="timestamp_granularities[]",
            )
        if self.timestamp_granularities and self.response_format != "verbose_json":
            raise InvalidRequest(
                "timestamp_granularities requires response_format 'verbose_json'", param="timestamp_granularities[]"
            )
        if self.stream and self.response_format not in ("json", "text"):
            raise InvalidRequest(
                f"stream is only available with response_format 'json' or 'text', not {self.response_format!r}",
                param="stream",
            )


class UploadedFile(BaseModel):
    """A file part of the form, read into memory (the body limit has already bounded its size)."""

    model_config = ConfigDict(frozen=True)

    filename: str | None
    data: bytes = Field(repr=False)


def _audio_format(filename: str) -> str:
    suffix = PurePath(filename).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_FORMATS:
        accepted = ", ".join(sorted(UPLOAD_FORMATS))
        shown = f"'{suffix}'" if suffix else "no extension"
        raise InvalidRequest(
            f"the file {filename!r} has {shown}; accepted: {accepted}", param="file", code="invalid_file_format"
        )
    return UPLOAD_FORMATS[suffix]


def _form_bool(value: Any, name: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise InvalidRequest(f"{name} must be true or false, not {value!r}", param=name)


# ---------------------------------------------------------------- answers


class UsageTokens(BaseModel):
    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int


class Segment(BaseModel):
    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class Transcription(BaseModel):
    text: str
    usage: UsageTokens | None = None


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[Segment] | None = None
    usage: UsageTokens | None = None


def subtitles(text: str, duration: float, kind: Literal["srt", "vtt"]) -> str:
    """One cue spanning the clip: the model gives text, not timing (there is nothing finer to say honestly)."""
    sep = "," if kind == "srt" else "."
    cue = f"{_clock(0.0, sep)} --> {_clock(duration, sep)}\n{text.strip()}\n"
    return f"1\n{cue}" if kind == "srt" else f"WEBVTT\n\n{cue}"


def _clock(seconds: float, sep: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"
