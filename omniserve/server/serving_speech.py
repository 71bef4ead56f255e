"""``POST /v1/audio/speech`` (and ``GET /v1/audio/voices``): text to audio through the checkpoint's talker.

It does not go through the text engine (the speech component loads its own copy of the model, see
``omniserve.speech.synthesizer``), so it is a plain handler rather than an ``OpenAIServing`` subclass,
with the same guards: drain admission, the served model's name, OpenAI-shaped errors (raised as
``OmniServeError`` types and mapped once in ``server/errors.py``), cancellation when the client leaves,
and the request-latency metric. The audio is synthesized whole, then encoded, then sent as a chunked
body (or as ``speech.audio.delta`` events); producing audio while the talker still runs is later work.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from omniserve.errors import InvalidRequest
from omniserve.protocol_speech import SpeechAudioDelta, SpeechAudioDone, SpeechRequest, SpeechUsage, VoiceList
from omniserve.server.errors import parse_body
from omniserve.server.serving_base import CLIENT_CLOSED_REQUEST, ServingContext, until_disconnect
from omniserve.server.sse import sse_event
from omniserve.speech.base import Speech
from omniserve.speech.encode import MEDIA_TYPES, chunks, encode
from omniserve.speech.synthesizer import SpeechSynthesizer
from omniserve.speech.tempo import change_tempo


class CannotSpeak(InvalidRequest):
    """Audio output asked of a checkpoint without a talker (or served with --no-speech)."""

    default_code = "audio_output_unsupported"


def cannot_speak(ctx: ServingContext, refused: str, *, param: str) -> CannotSpeak:
    """The 400 for audio output from a server without a synthesizer, naming the cause: ``--no-speech``, or a
    checkpoint that cannot speak. ``refused`` says what was refused, in the endpoint's words."""
    reason = (
        "this server runs with --no-speech"
        if not ctx.server.speech
        else "its checkpoint has no talker and codec (a thinker-only or text model)"
    )
    return CannotSpeak(f"the model '{ctx.model_name}' {refused}: {reason}", param=param)


class SpeechServing:
    endpoint = "/v1/audio/speech"

    def __init__(self, ctx: ServingContext, synthesizer: SpeechSynthesizer | None) -> None:
        self.ctx = ctx
        self.synthesizer = synthesizer

    async def voices(self) -> dict:
        return VoiceList(data=list(self._speaking().voices)).model_dump()

    async def handle(self, http_request: Request) -> Response:
        arrived = time.perf_counter()
        self.ctx.drain.check_admitting()
        request = parse_body(SpeechRequest, await http_request.body())
        self.ctx.check_model(request.model)
        synthesizer = self._speaking()
        self._check_input(request.input)
        synthesizer.check_voice(request.voice_name)  # before waiting for a turn
        work = synthesizer.synthesize(request.input, voice=request.voice_name, instructions=request.instructions)
        speech = await until_disconnect(http_request, self.ctx.drain.bounded(work))
        if speech is None:  # the client left: the synthesis was stopped, nobody to answer
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        data = await asyncio.to_thread(_render, speech, request)
        metrics = self.ctx.metrics
        metrics.prompt_tokens.labels(self.ctx.model_name).inc(speech.input_tokens)
        metrics.latency.labels(self.endpoint, self.ctx.model_name).observe(time.perf_counter() - arrived)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request.stream_format == "sse":
            usage = SpeechUsage(
                input_tokens=speech.input_tokens,
                output_tokens=speech.output_tokens,
                total_tokens=speech.input_tokens + speech.output_tokens,
            )
            return StreamingResponse(_events(data, usage), media_type="text/event-stream", headers=headers)
        return StreamingResponse(_body(data), media_type=MEDIA_TYPES[request.response_format], headers=headers)

    def _speaking(self) -> SpeechSynthesizer:
        if self.synthesizer is None:
            raise cannot_speak(self.ctx, "cannot speak", param="model")
        return self.synthesizer

    def _check_input(self, text: str) -> None:
        limit = self.ctx.server.speech_max_input
        if not text.strip():
            raise InvalidRequest("input is empty: give the text to speak", param="input")
        if len(text) > limit:
            raise InvalidRequest(
                f"input is {len(text)} characters; this server speaks at most {limit} (--speech-max-input)",
                param="input",
                code="string_above_max_length",
            )


def speech_answers(errors: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """What /openapi.json says the endpoint answers: the audio in each format, or audio events."""
    audio = {media: {"schema": {"type": "string", "format": "binary"}} for media in sorted(set(MEDIA_TYPES.values()))}
    events = {"text/event-stream": {"schema": {"type": "string"}}}
    description = "the audio file in response_format, or speech.audio.delta/done events with stream_format sse"
    return {200: {"description": description, "content": {**audio, **events}}, **errors}


def _render(speech: Speech, request: SpeechRequest) -> bytes:
    samples = change_tempo(speech.samples, speech.sample_rate, request.speed)
    return encode(samples, speech.sample_rate, request.response_format)


def _body(data: bytes) -> Iterator[bytes]:
    yield from chunks(data)


async def _events(data: bytes, usage: SpeechUsage) -> AsyncIterator[str]:
    for piece in chunks(data):
        yield sse_event(SpeechAudioDelta(audio=base64.b64encode(piece).decode()).model_dump())
    yield sse_event(SpeechAudioDone(usage=usage).model_dump())
