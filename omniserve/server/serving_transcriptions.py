"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` on any model that listens.

An omni or audio-language model (Qwen2-Audio, Qwen2.5-Omni, ...) transcribes when asked to in its own
chat template, so an upload becomes one chat turn: the audio as an ``input_audio`` part and the
server's instruction (``--transcription-instruction`` / ``--translation-instruction``, plus the
request's ``language`` and ``prompt``). That turn goes through the chat endpoint's own preparation:
the same media limits, decoding, template and engine. The answer is then shaped as OpenAI's audio
endpoints shape it. A model that takes no audio gets the chat path's 400 naming the modality.
"""

from __future__ import annotations

import asyncio
import base64
import math
import zlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from omniserve.engines.base import GenerationRequest, TokenLogprobs
from omniserve.errors import InvalidRequest, OmniServeError
from omniserve.protocol import ChatCompletionRequest
from omniserve.protocol_audio import (
    Segment,
    Transcription,
    TranscriptionRequest,
    TranscriptionVerbose,
    UploadedFile,
    UsageTokens,
    subtitles,
)
from omniserve.server.serving_base import OpenAIServing, Submitted
from omniserve.server.serving_chat import ChatServing

#: Form fields a request may carry; anything beyond is refused before it is read into memory.
_MAX_FIELDS = 16
#: Where the upload sits in the chat turn it becomes (errors about it are reported as ``file``).
_AUDIO_PART = "messages[0].content[0]"


class TranscriptionServing(OpenAIServing[TranscriptionRequest]):
    request_model = TranscriptionRequest
    endpoint = "/v1/audio/transcriptions"
    translation = False

    async def parse(self, http_request: Request) -> TranscriptionRequest:
        content_type = http_request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            given = content_type or "no content type"
            raise InvalidRequest(f"{self.endpoint} takes multipart/form-data (a file part and fields), not {given}")
        try:
            form = await http_request.form(max_files=1, max_fields=_MAX_FIELDS)
        except MultiPartException as exc:  # too many parts, a part over the size cap, a broken boundary
            raise InvalidRequest(f"the multipart body cannot be read: {exc.message}") from None
        try:
            fields: dict[str, list[Any]] = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    value = UploadedFile(filename=value.filename, data=await value.read())
                fields.setdefault(name, []).append(value)
        finally:
            await form.close()
        return TranscriptionRequest.from_form(fields, translation=self.translation)

    async def prepare(self, request: TranscriptionRequest) -> list[GenerationRequest]:
        chat = ChatCompletionRequest.model_validate(
            {
                "model": request.model,
                "messages": [{"role": "user", "content": self._content(request)}],
                "temperature": request.temperature,
                "max_completion_tokens": self.ctx.server.transcription_max_tokens,
                "logprobs": request.response_format == "verbose_json",  # avg_logprob of the segment
            }
        )
        try:
            return await ChatServing(self.ctx).prepare(chat)
        except OmniServeError as exc:  # the chat turn's audio part is this request's file
            if exc.param is not None and exc.param.startswith(_AUDIO_PART):
                exc.param = "file"
            raise

    def _content(self, request: TranscriptionRequest) -> list[dict[str, Any]]:
        server = self.ctx.server
        instruction = server.translation_instruction if self.translation else server.transcription_instruction
        if request.language:
            instruction += f" The speech is in the language '{request.language}'."
        if request.prompt:
            instruction += f" Context and spelling to follow: {request.prompt}"
        audio = {"data": base64.b64encode(request.file).decode(), "format": request.audio_format}
        return [{"type": "input_audio", "input_audio": audio}, {"type": "text", "text": instruction}]

    async def chunks(self, request: TranscriptionRequest, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        text = ""
        async for _, delta in submitted.deltas():
            if delta.text:
                text += delta.text
                yield {"type": "transcript.text.delta", "delta": delta.text}
        yield {"type": "transcript.text.done", "text": text, "usage": self._usage(submitted).model_dump()}

    async def collect(self, request: TranscriptionRequest, submitted: Submitted) -> dict[str, Any]:
        text, tokens, logprobs = "", [], []
        async for _, delta in submitted.deltas():
            text += delta.text
            tokens.extend(delta.token_ids)
            logprobs.extend(delta.logprobs or ())
        text = text.strip()
        fmt = request.response_format
        if fmt == "json":
            return Transcription(text=text, usage=self._usage(submitted)).model_dump(exclude_none=True)
        if fmt == "text":
            return {"text": text}
        duration = await asyncio.to_thread(self._duration, request)
        if fmt in ("srt", "vtt"):
            return {"text": subtitles(text, duration, fmt)}
        return TranscriptionVerbose(
            task="translate" if self.translation else "transcribe",
            language="english" if self.translation else (request.language or "unknown"),
            duration=duration,
            text=text,
            segments=[_segment(text, tokens, logprobs, duration, request.temperature)] if text else [],
            usage=self._usage(submitted),
        ).model_dump(exclude_none=True)

    def response(self, request: TranscriptionRequest, body: dict[str, Any], headers: dict[str, str]) -> Response:
        if request.response_format in ("text", "srt", "vtt"):
            media = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}[request.response_format]
            return PlainTextResponse(body["text"], media_type=f"{media}; charset=utf-8", headers=headers)
        return JSONResponse(body, headers=headers)

    def _duration(self, request: TranscriptionRequest) -> float:
        """The clip's length: from its header where it says, else by decoding it (under the same limits)."""
        from omniserve.media.audio import decode_audio, probe_audio

        limits = self.ctx.server.media
        declared = probe_audio(request.file, limits, format=request.audio_format, param="file").audio_seconds
        if declared:
            return round(declared, 3)
        return round(decode_audio(request.file, limits, format=request.audio_format, param="file").duration, 3)

    @staticmethod
    def _usage(submitted: Submitted) -> UsageTokens:
        usage = submitted.usage()
        return UsageTokens(
            input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
        )


class TranslationServing(TranscriptionServing):
    endpoint = "/v1/audio/translations"
    translation = True


def _segment(
    text: str, tokens: list[int], logprobs: list[TokenLogprobs], duration: float, temperature: float
) -> Segment:
    """The whole answer as one segment: the model gives no timing finer than the clip."""
    average = sum(lp.logprob for lp in logprobs) / len(logprobs) if logprobs else 0.0
    raw = text.encode()
    compressed = len(zlib.compress(raw)) or 1
    return Segment(
        id=0,
        start=0.0,
        end=duration,
        text=text,
        tokens=tokens,
        temperature=temperature,
        avg_logprob=average if math.isfinite(average) else -1e9,
        compression_ratio=len(raw) / compressed,
        no_speech_prob=0.0,  # not measured: the model reports no such probability (documented)
    )
