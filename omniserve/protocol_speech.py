"""OpenAI's ``POST /v1/audio/speech`` on the wire: a JSON request in, audio bytes (or audio events) out.

The request mirrors ``openai.types.audio.SpeechCreateParams``. The answer is the audio file itself in
``response_format``; with ``stream_format: "sse"`` it is server-sent events instead:
``speech.audio.delta`` (base64 audio) then ``speech.audio.done`` (token usage), as OpenAI sends them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class VoiceId(BaseModel):
    """A voice named by id (OpenAI's custom-voice form); here the id is one of the checkpoint's speakers."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str = Field(description="The text to speak (its longest length is the server's --speech-max-input).")
    voice: str | VoiceId = Field(description="One of the checkpoint's speakers (GET /v1/audio/voices lists them).")
    response_format: SpeechFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Playback speed; the pitch is kept.")
    instructions: str | None = Field(
        None, max_length=4096, description="How to speak: the turn the spoken text answers in the model's chat."
    )
    stream_format: Literal["audio", "sse"] = "audio"

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


class SpeechUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of the next bytes of the file in ``response_format``


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


class VoiceList(BaseModel):
    """``GET /v1/audio/voices``: the served checkpoint's speakers (not an OpenAI endpoint; OpenAI's are fixed)."""

    object: Literal["list"] = "list"
    data: list[str]
