"""Spoken chat replies (``modalities: ["text", "audio"]``) end to end: the official client, a real server, the
tiny speaking Omni. Its thinker and talker have random weights: the text is random tokens and the audio noise of
random length; what is checked is what a client relies on: the reply's shape, audio that decodes at 24 kHz,
audio that arrives while the text is still being written, and a 4xx for each request that cannot be served.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from omniserve.speech.chat_audio import PIECE_BYTES, Segmenter, fade
from tests.conftest import RunningServer, idle, wait_until
from tests.speaking_server import NAME, RATE, decode_audio, refusal, speaking_server

MAX_SECONDS = 0.2  # --speech-max-seconds: each synthesis of the random talker is cut there (fast tests)
SPEAK = {"modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "wav"}}
HI = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(speaking_model: Path) -> Iterator[RunningServer]:
    with speaking_server(speaking_model, speech_max_seconds=MAX_SECONDS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return server.client()


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "pcm16"])
def test_a_reply_is_spoken_whole(client: openai.OpenAI, fmt: str) -> None:
    """``message.audio`` holds the whole reply spoken; its text is the transcript and ``content`` is null."""
    started = time.time()
    reply = client.chat.completions.create(
        model=NAME,
        messages=HI,
        max_tokens=12,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": fmt},
        extra_body={"ignore_eos": True},
    )
    message = reply.choices[0].message
    assert message.content is None and message.audio is not None
    audio = message.audio
    assert audio.id and audio.transcript.strip() and reply.usage.completion_tokens == 12
    assert audio.expires_at >= started + 3000  # kept an hour for later turns
    samples, rate = decode_audio(base64.b64decode(audio.data), fmt)
    assert rate == RATE
    assert 0.015 <= len(samples) / RATE <= MAX_SECONDS + 0.1  # one synthesis: at least one code, at most the cap
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0


def test_a_streamed_reply_is_spoken_while_it_is_written(client: openai.OpenAI) -> None:
    """pcm16 pieces arrive between text chunks, the first before the text ends; the id comes once, ``expires_at``
    last, the end of the choice after all audio; the pieces join into one valid base64 string."""
    stream = client.chat.completions.create(
        model=NAME,
        messages=HI,
        max_tokens=250,  # many segments of random text (cut at sentence ends, or at 48 then 160 characters)
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "pcm16"},
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    events: list[tuple[str, Any]] = []
    finish = usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert choice.delta.content in (None, "")  # with audio, the text travels as the transcript
            audio = choice.delta.audio
            if audio is not None:
                events += [(key, value) for key, value in audio.model_dump(exclude_none=True).items()]
            if choice.finish_reason is not None:
                assert finish is None and audio is None
                finish = (choice.finish_reason, len(events))
    assert finish == ("length", len(events)) and usage is not None and usage.completion_tokens == 250
    kinds = [kind for kind, _ in events]
    assert kinds.count("id") == 1 and kinds[0] == "id" and kinds[-1] == "expires_at"
    last_text = max(i for i, kind in enumerate(kinds) if kind == "transcript")
    first_audio = kinds.index("data")
    assert first_audio < last_text, "no audio before the text was done"
    pieces = [value for kind, value in events if kind == "data"]
    joined = base64.b64decode("".join(pieces), validate=True)  # the openai helpers concatenate, then decode
    assert joined == b"".join(base64.b64decode(piece) for piece in pieces)
    assert all(len(base64.b64decode(piece)) <= PIECE_BYTES for piece in pieces)
    samples, _ = decode_audio(joined, "pcm16")
    transcript = "".join(value for kind, value in events if kind == "transcript")
    segments = len(Segmenter().feed(transcript)) + 1
    # segments that queue up behind a synthesis are spoken together: between one synthesis and one per segment
    assert segments >= 3 and 0.015 <= len(samples) / RATE <= segments * (MAX_SECONDS + 0.02)


def test_a_client_that_leaves_mid_audio_frees_the_engine_and_the_talker(server: RunningServer) -> None:
    """Closing the connection after the first audio stops the text and the speech under way."""
    body = {
        "model": NAME,
        "messages": HI,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
        "modalities": ["text", "audio"],
        "audio": {"voice": "Chelsie", "format": "pcm16"},
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"data":"' in line:  # the first audio piece: the talker has spoken, the thinker still writes
                break
        else:
            pytest.fail("the stream ended without audio")
    synthesizer = server.app.state.speech
    wait_until(lambda: idle(server) and not synthesizer.busy, timeout=10)  # the text alone would take 20 s more


def test_the_stream_helper_assembles_the_spoken_reply(client: openai.OpenAI) -> None:
    """``client.chat.completions.stream`` accumulates the deltas into ``message.audio`` as the spec shapes it:
    one id, the transcript and the base64 data concatenated."""
    with client.chat.completions.stream(
        model=NAME,
        messages=HI,
        max_tokens=30,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"},
        extra_body={"ignore_eos": True},
    ) as stream:
        for _ in stream:  # get_final_completion() refuses a reply cut by max_tokens: read the snapshot instead
            pass
        snapshot = stream.current_completion_snapshot
    message = snapshot.choices[0].message
    assert message.content is None and message.audio is not None
    assert message.audio.id.startswith("audio") and message.audio.transcript and message.audio.expires_at > 0
    samples, _ = decode_audio(base64.b64decode(message.audio.data, validate=True), "pcm16")
    assert len(samples) > 0


def test_a_spoken_reply_sent_back_by_id_brings_its_text(client: openai.OpenAI) -> None:
    """An assistant turn of only ``audio: {id}`` reads as its transcript while the id is known, else as empty."""
    first = client.chat.completions.create(model=NAME, messages=HI, max_tokens=16, **SPEAK)
    audio_id = first.choices[0].message.audio.id

    def prompt_tokens(audio_ref: str) -> int:
        history = [*HI, {"role": "assistant", "audio": {"id": audio_ref}}, {"role": "user", "content": "Again."}]
        reply = client.chat.completions.create(model=NAME, messages=history, max_tokens=1)
        return reply.usage.prompt_tokens

    assert prompt_tokens(audio_id) > prompt_tokens("audio-unknown")


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio.voice", "Chelsie, Ethan"),
        ({"audio": {"voice": "Ethan", "format": "ogg"}}, "audio.format", "'mp3', 'flac', 'opus' or 'pcm16'"),
        ({"audio": None}, "audio", "voice"),
        ({"modalities": ["text"]}, "modalities", '["text", "audio"]'),
        ({"stream": True}, "audio.format", "pcm16"),
        ({"n": 2}, "n", "one choice"),
    ],
)
def test_bad_audio_requests_are_a_400_naming_the_fix(
    client: openai.OpenAI, fields: dict[str, Any], param: str, says: str
) -> None:
    request = {"model": NAME, "messages": HI, "max_tokens": 2, **SPEAK, **fields}
    exc = refusal(lambda: client.chat.completions.create(**{k: v for k, v in request.items() if v is not None}))
    error = exc.response.json()["error"]
    assert exc.status_code == 400 and error["param"] == param and says in error["message"], error
    assert client.chat.completions.create(model=NAME, messages=HI, max_tokens=2, **SPEAK).choices[0].message.audio


def test_a_thinker_only_checkpoint_cannot_speak_a_reply(omni_server: RunningServer) -> None:
    client = omni_server.client()
    exc = refusal(
        lambda: client.chat.completions.create(model=omni_server.model_name, messages=HI, max_tokens=2, **SPEAK)
    )
    error = exc.response.json()["error"]
    assert exc.status_code == 400 and error["code"] == "audio_output_unsupported"
    assert error["param"] == "modalities" and "cannot produce audio" in error["message"]
    reply = client.chat.completions.create(model=omni_server.model_name, messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None  # text replies as before


def test_a_server_started_with_no_speech_cannot_speak_a_reply(speaking_model: Path) -> None:
    with speaking_server(speaking_model, speech=False) as srv:
        client = srv.client()
        exc = refusal(lambda: client.chat.completions.create(model=NAME, messages=HI, max_tokens=2, **SPEAK))
        error = exc.response.json()["error"]
        assert exc.status_code == 400 and error["code"] == "audio_output_unsupported"
        assert "--no-speech" in error["message"]


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("Hello there. How are you? Fine!", ["Hello there.", " How are you?", " Fine!"]),
        ("Pi is 3.14 today.\nNew line", ["Pi is 3.14 today.", "\n", "New line"]),
        ("你好。世界！", ["你好。", "世界！"]),
        ("word " * 50, ["word " * 8 + "word", " word" * 32, " word" * 9 + " "]),
        ("x" * 250, ["x" * 48, "x" * 160, "x" * 42]),
    ],
)
def test_segments_end_at_sentences_or_at_the_length_cap(text: str, segments: list[str]) -> None:
    segmenter = Segmenter()
    found = [piece for char in text for piece in segmenter.feed(char)]  # as a stream of one character at a time
    found += segmenter.finish()
    assert found == [s for s in segments if s.strip()]  # blank segments (a lone newline) have nothing to speak


def test_segments_fade_in_and_out() -> None:
    joined = np.concatenate([fade(np.ones(2400, np.float32), RATE), fade(-np.ones(2400, np.float32), RATE)])
    assert abs(joined[0]) < 1e-6 and abs(joined[2399]) < 1e-6 and abs(joined[2400]) < 1e-6
    assert np.abs(np.diff(joined)).max() < 0.02  # no jump at the join
    assert joined[1200] == 1.0
