"""/v1/audio/transcriptions and /v1/audio/translations with the official openai client against a real server:
every response format, streaming, the chat path's limits and refusals, and OpenAI-shaped 400s for bad forms."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer, start_server
from tests.media_factory import audio_bytes

CLIP_SECONDS = 1.5


@pytest.fixture(scope="module")
def wav() -> bytes:
    return audio_bytes("wav", seconds=CLIP_SECONDS, sample_rate=16_000)


@pytest.fixture(scope="module")
def short_server(tiny_omni: Path) -> Iterator[RunningServer]:
    """Transcripts capped at 12 tokens: the random-weight model would otherwise talk for 448."""
    srv = start_server(tiny_omni, name="tiny-omni", server={"transcription_max_tokens": 12})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def audio_client(short_server: RunningServer) -> Any:
    return short_server.client()


def test_json_transcript_with_usage(audio_client: Any, wav: bytes) -> None:
    result = audio_client.audio.transcriptions.create(model="tiny-omni", file=("clip.wav", wav))
    assert isinstance(result.text, str) and result.text
    usage = result.usage
    assert usage.type == "tokens" and 0 < usage.output_tokens <= 12
    assert usage.input_tokens > 20  # the audio's placeholder tokens and the instruction are in the prompt
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_the_transcript_is_what_the_chat_endpoint_answers_for_the_same_turn(
    audio_client: Any, short_server: RunningServer, wav: bytes
) -> None:
    """The upload becomes one chat turn (audio + the server's instruction), rendered by the model's template."""
    import base64

    from omniserve.config import ServerConfig

    instruction = ServerConfig().transcription_instruction + " The speech is in the language 'en'."
    chat = audio_client.chat.completions.create(
        model="tiny-omni",
        temperature=0,
        max_completion_tokens=12,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                    {"type": "text", "text": instruction},
                ],
            }
        ],
    )
    result = audio_client.audio.transcriptions.create(model="tiny-omni", file=("clip.wav", wav), language="en")
    assert result.text == chat.choices[0].message.content.strip()
    assert result.usage.input_tokens == chat.usage.prompt_tokens


def test_text_srt_and_vtt(audio_client: Any, wav: bytes) -> None:
    text = audio_client.audio.transcriptions.create(model="tiny-omni", file=("clip.wav", wav), response_format="text")
    assert isinstance(text, str) and text
    srt = audio_client.audio.transcriptions.create(model="tiny-omni", file=("clip.wav", wav), response_format="srt")
    assert re.fullmatch(r"1\n00:00:00,000 --> 00:00:01,5\d\d\n.+\n", srt, re.S), srt
    vtt = audio_client.audio.transcriptions.create(model="tiny-omni", file=("clip.wav", wav), response_format="vtt")
    assert re.fullmatch(r"WEBVTT\n\n00:00:00\.000 --> 00:00:01\.5\d\d\n.+\n", vtt, re.S), vtt


def test_verbose_json_reports_the_clip_and_one_segment(audio_client: Any, wav: bytes) -> None:
    result = audio_client.audio.transcriptions.create(
        model="tiny-omni",
        file=("clip.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
        language="en",
    )
    assert result.duration == pytest.approx(CLIP_SECONDS, abs=0.05)
    assert result.language == "en"
    (segment,) = result.segments
    assert (segment.start, segment.end) == (0.0, result.duration)
    assert segment.text == result.text and 0 < len(segment.tokens) <= 12
    assert segment.avg_logprob < 0  # from the engine's logprobs of those tokens


def test_streamed_transcript_deltas_add_up_to_the_done_event(audio_client: Any, wav: bytes) -> None:
    events = list(audio_client.audio.transcriptions.create(model="tiny-omni", file=("clip.wav", wav), stream=True))
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1]) == done.text and done.text


def test_translation(audio_client: Any, wav: bytes) -> None:
    mp3 = audio_bytes("mp3")
    result = audio_client.audio.translations.create(model="tiny-omni", file=("clip.mp3", mp3))
    assert isinstance(result.text, str) and result.text
    verbose = audio_client.audio.translations.create(
        model="tiny-omni", file=("clip.wav", wav), response_format="verbose_json"
    )
    assert verbose.task == "translate" and verbose.language == "english"


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities[]", "word timestamps are not available"),
        ({"timestamp_granularities": ["segment"]}, "timestamp_granularities[]", "requires response_format"),
        ({"response_format": "srt", "stream": True}, "stream", "only available with response_format"),
        ({"temperature": 1.5}, "temperature", "less than or equal to 1"),
        ({"file": ("notes.txt", b"hello")}, "file", "accepted: flac"),
        ({"file": ("clip.wav", b"RIFF....WAVEfmt not really")}, "file", "audio"),
        ({"model": "other"}, "model", "does not exist"),
    ],
    ids=[
        "word-granularity",
        "granularity-without-verbose",
        "stream-srt",
        "temperature",
        "extension",
        "corrupt",
        "model",
    ],
)
def test_bad_requests_are_openai_errors(
    audio_client: Any, wav: bytes, kwargs: dict[str, Any], param: str, message: str
) -> None:
    call = {"model": "tiny-omni", "file": ("clip.wav", wav), **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        audio_client.audio.transcriptions.create(**call)
    assert caught.value.status_code in (400, 404)
    error = caught.value.body if isinstance(caught.value.body, dict) else {}
    assert error.get("param") == param, caught.value.body
    assert message in error.get("message", ""), caught.value.body


def test_form_problems_the_client_cannot_make(short_server: RunningServer, wav: bytes) -> None:
    url = short_server.base_url + "/v1/audio/transcriptions"
    as_json = httpx.post(url, json={"model": "tiny-omni", "file": "x"}, timeout=30)
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]
    no_file = httpx.post(url, data={"model": "tiny-omni"}, files={"x": ("", b"")}, timeout=30)
    assert no_file.status_code == 400
    unknown = httpx.post(url, data={"model": "tiny-omni", "max_tokens": "5"}, files={"file": ("a.wav", wav)})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "max_tokens"
    language_on_translation = httpx.post(
        short_server.base_url + "/v1/audio/translations",
        data={"model": "tiny-omni", "language": "de"},
        files={"file": ("a.wav", wav)},
        timeout=30,
    )
    assert language_on_translation.status_code == 400
    assert language_on_translation.json()["error"]["param"] == "language"
    two_files = httpx.post(url, data={"model": "tiny-omni"}, files=[("file", ("a.wav", wav)), ("file", ("b.wav", wav))])
    assert two_files.status_code == 400


def test_a_model_without_audio_input_refuses_naming_the_modality(tiny_qwen2_vl: Path, wav: bytes) -> None:
    srv = start_server(tiny_qwen2_vl, name="vl", server={"transcription_max_tokens": 4})
    try:
        with pytest.raises(openai.BadRequestError, match="does not accept audio input"):
            srv.client().audio.transcriptions.create(model="vl", file=("clip.wav", wav))
    finally:
        srv.stop()


def test_transcribes_on_a_published_template(tmp_path_factory: pytest.TempPathFactory, wav: bytes) -> None:
    """Qwen2-Audio with the chat template Qwen publishes (default system prompt, 'Audio N:' labels): the
    upload's turn is rendered by that template, and the answer is shaped the same way."""
    from omniserve.models.families import get
    from tests.test_train_support import published_template

    family = get("qwen2_audio")
    assert family.template is not None
    model = family.build(tmp_path_factory.mktemp("qwen2-audio") / "ckpt", published_template(family.template))
    srv = start_server(model, name="qwen2-audio", server={"transcription_max_tokens": 6})
    try:
        client = srv.client()
        result = client.audio.transcriptions.create(model="qwen2-audio", file=("clip.wav", wav))
        assert 0 < result.usage.output_tokens <= 6
        chat = client.chat.completions.create(
            model="qwen2-audio",
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=1,
        )
        assert result.usage.input_tokens > chat.usage.prompt_tokens + 20  # the clip's audio tokens are in the prompt
        srt = client.audio.transcriptions.create(model="qwen2-audio", file=("clip.wav", wav), response_format="srt")
        assert srt.startswith("1\n00:00:00,000 --> 00:00:01,5")
    finally:
        srv.stop()
