"""Chat replies spoken as they are written (``modalities: ["text", "audio"]`` on ``/v1/chat/completions``).

The talker speaks a whole text at a time (``SpeechModel.synthesize``), so a streamed reply is cut into
segments as the thinker writes it (``Segmenter``: at sentence ends, or at ``max_chars`` when the text has
none) and each finished segment is spoken while the thinker writes the next (``SpokenStream``). Audio thus
arrives before the text is done. The segments go through the server's one ``SpeechSynthesizer``, in order,
so decoding of other requests never waits for speech; segments are spoken independently (their prosody
does not carry over) and each is faded in and out over a few milliseconds so that joins do not click.

``SpokenReplies`` remembers each spoken reply's transcript by its audio id for ``expires_at``: a later
request that sends the reply back as ``{"role": "assistant", "audio": {"id": ...}}`` gets its text.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from omniserve.protocol import DeltaAudio, DeltaMessage, dump
from omniserve.speech.encode import encode

#: A segment ends after one of these, followed by whitespace (ASCII) or at once (CJK full-width marks).
_SENTENCE_END = re.compile(r"(?:[.!?;:](?=\s)|[。！？；]|\n)")
#: Longest segment when the text has no sentence end. The first is shorter: its audio is the reply's first
#: (each segment costs one thinker step per token, then the talker, before any of its audio exists).
FIRST_SEGMENT_CHARS = 48
MAX_SEGMENT_CHARS = 160
#: Longest text spoken at once when segments queue up behind a synthesis (they are joined up to this).
MAX_JOINED_CHARS = 4 * MAX_SEGMENT_CHARS
#: Fade at each segment's edges: removes the click of a join between two independently spoken segments.
FADE_SECONDS = 0.005
#: Bytes of pcm16 per streamed piece: a multiple of 6, so that every piece but the last is whole samples and
#: whole base64 quanta (the openai helpers concatenate the ``data`` strings of a stream, then decode them).
PIECE_BYTES = 6 * 4096
#: How long a spoken reply's id stands for its transcript, and how many ids are kept at most.
RETENTION_SECONDS = 3600
MAX_REMEMBERED = 10_000


class Segmenter:
    """Cuts streamed text into segments to speak: at sentence ends, else at the last space within the length cap
    (``first_chars`` for the first segment, ``max_chars`` after it)."""

    def __init__(self, max_chars: int = MAX_SEGMENT_CHARS, first_chars: int = FIRST_SEGMENT_CHARS) -> None:
        self.max_chars = max_chars
        self.first_chars = first_chars
        self._pending = ""
        self._cuts = 0

    def feed(self, text: str) -> list[str]:
        """The segments that ``text`` completes (possibly none)."""
        self._pending += text
        done: list[str] = []
        while True:
            cut = self._cut()
            if cut is None:
                return [s for s in done if s.strip()]
            done.append(self._pending[:cut])
            self._pending = self._pending[cut:]
            self._cuts += 1

    def finish(self) -> list[str]:
        """What remains once the text is complete."""
        rest, self._pending = self._pending, ""
        return [rest] if rest.strip() else []

    def _cut(self) -> int | None:
        cap = self.max_chars if self._cuts else self.first_chars
        end = _SENTENCE_END.search(self._pending)
        if end is not None and end.end() <= cap:
            return end.end()
        if len(self._pending) <= cap:
            return None
        space = self._pending.rfind(" ", 1, cap + 1)
        return space if space > 0 else cap


def fade(samples: np.ndarray, sample_rate: int, seconds: float = FADE_SECONDS) -> np.ndarray:
    """``samples`` with a raised-cosine fade in and out, so consecutive segments join without a jump."""
    width = min(int(seconds * sample_rate), samples.size // 2)
    if width <= 0:
        return samples
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, width, dtype=np.float32))).astype(np.float32)
    out = samples.astype(np.float32, copy=True)
    out[:width] *= ramp
    out[-width:] *= ramp[::-1]
    return out


def wire_format(fmt: str) -> str:
    """The encoder's name for a chat ``audio.format`` (OpenAI says ``pcm16`` there, ``pcm`` for speech)."""
    return "pcm" if fmt == "pcm16" else fmt


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class SpokenReplies:
    """Transcripts of spoken replies by audio id, for ``expires_at`` (bounded: the oldest go first)."""

    def __init__(self, retention_seconds: float = RETENTION_SECONDS, max_entries: int = MAX_REMEMBERED) -> None:
        self.retention_seconds = retention_seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def remember(self, audio_id: str, transcript: str) -> int:
        """Keep ``transcript`` under ``audio_id``; the Unix time until which it is kept."""
        expires = time.time() + self.retention_seconds
        self._entries[audio_id] = (expires, transcript)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return int(expires)

    def transcript(self, audio_id: str) -> str | None:
        """The reply's text, or None when the id is unknown or expired."""
        entry = self._entries.get(audio_id)
        if entry is None or entry[0] < time.time():
            self._entries.pop(audio_id, None)
            return None
        return entry[1]


class SpokenStream:
    """Speaks a reply segment by segment while it is written; hands out its pcm16 bytes in base64-safe pieces.

    ``feed`` the reply's text as it comes, ``ready()`` takes the audio spoken so far without waiting,
    ``finish()`` then ``rest()`` wait for the remainder. One task speaks the segments in order through
    ``speak`` (the synthesizer: one synthesis at a time across the server); ``close`` stops it.
    """

    def __init__(
        self, speak: Callable[[str], Awaitable[np.ndarray]], sample_rate: int, segmenter: Segmenter | None = None
    ) -> None:
        self._speak = speak
        self._rate = sample_rate
        self._segmenter = segmenter or Segmenter()
        self._segments: asyncio.Queue[str | None] = asyncio.Queue()
        self._audio: asyncio.Queue[bytes | None] = asyncio.Queue()  # pcm16 per segment; None: no more
        self._held = b""  # pcm16 not yet handed out (the part of a piece that is not whole yet)
        self._task = asyncio.ensure_future(self._run())
        self.seconds = 0.0  # audio spoken so far

    def feed(self, text: str) -> None:
        for segment in self._segmenter.feed(text):
            self._segments.put_nowait(segment)

    def finish(self) -> None:
        for segment in self._segmenter.finish():
            self._segments.put_nowait(segment)
        self._segments.put_nowait(None)

    def ready(self) -> list[bytes]:
        """Whole pieces spoken so far, without waiting; raises what made speaking fail."""
        ended = False
        while not self._audio.empty():
            data = self._audio.get_nowait()
            if data is None:
                ended = True
                break
            self._held += data
        if ended:
            self._task.result()
            self._audio.put_nowait(None)  # for ``rest``
        return self._pieces(final=False)

    async def rest(self) -> AsyncIterator[bytes]:
        """Every remaining piece, as each segment is spoken (call ``finish`` first)."""
        while (data := await self._audio.get()) is not None:
            self._held += data
            for piece in self._pieces(final=False):
                yield piece
        self._task.result()
        for piece in self._pieces(final=True):
            yield piece

    async def close(self) -> None:
        """Stop speaking (the client left, or the stream failed): the synthesis under way stops at its next step."""
        if not self._task.done():
            self._task.cancel()
        await asyncio.wait({self._task})

    async def _run(self) -> None:
        try:
            ended = False
            while not ended and (segment := await self._segments.get()) is not None:
                # segments that queued up while the last one was spoken go as one: each synthesis has a fixed
                # cost (the prompt, the codec's pass), so speech that falls behind the text catches up
                while len(segment) < MAX_JOINED_CHARS and not self._segments.empty():
                    following = self._segments.get_nowait()
                    if following is None:
                        ended = True
                        break
                    segment += following
                samples = await self._speak(segment)
                self.seconds += samples.size / self._rate
                self._audio.put_nowait(encode(fade(samples, self._rate), self._rate, "pcm"))
        finally:
            self._audio.put_nowait(None)

    def _pieces(self, *, final: bool) -> list[bytes]:
        whole = len(self._held) if final else len(self._held) - len(self._held) % 6
        data, self._held = self._held[:whole], self._held[whole:]
        return [data[i : i + PIECE_BYTES] for i in range(0, len(data), PIECE_BYTES)]


async def spoken_chunks(
    chunks: AsyncIterator[dict[str, Any]], stream: SpokenStream, replies: SpokenReplies, audio_id: str
) -> AsyncIterator[dict[str, Any]]:
    """A one-choice chat stream with its reply spoken: the text moves to ``delta.audio.transcript`` (OpenAI's
    shape: ``content`` stays null), audio pieces go out between text chunks as segments are spoken, and the
    chunk that ends the choice waits for the rest of the audio and the ``expires_at`` that closes it."""
    transcript: list[str] = []
    named = False  # the first audio delta carries the id; the helpers concatenate repeated strings
    header: dict[str, Any] = {}

    def audio_delta(**fields: Any) -> DeltaAudio:
        nonlocal named
        if not named:
            fields["id"], named = audio_id, True
        return DeltaAudio(**fields)

    def chunk(delta: DeltaMessage, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": dump(delta), "logprobs": None, "finish_reason": finish_reason}
        return {**header, "choices": [choice], "usage": None}

    try:
        async for item in chunks:
            header = header or {key: item[key] for key in ("id", "object", "created", "model")}
            finish = None
            for choice in item["choices"]:
                delta = choice["delta"]
                text = delta.get("content")
                delta["content"] = None
                if text:
                    transcript.append(text)
                    stream.feed(text)
                    delta["audio"] = dump(audio_delta(transcript=text))
                finish, choice["finish_reason"] = choice["finish_reason"], None
            if finish is None:
                yield item
                for piece in stream.ready():
                    yield chunk(DeltaMessage(audio=audio_delta(data=b64(piece))))
                continue
            # the text is complete: what it still says, the rest of its audio, then the end of the choice
            if any(value is not None for key, value in delta.items() if key != "content") or choice["logprobs"]:
                yield item
            stream.finish()
            async for piece in stream.rest():
                yield chunk(DeltaMessage(audio=audio_delta(data=b64(piece))))
            expires_at = replies.remember(audio_id, "".join(transcript))
            yield chunk(DeltaMessage(audio=audio_delta(expires_at=expires_at)))
            yield chunk(DeltaMessage(), finish_reason=finish)
    finally:
        await stream.close()
