"""The spoken-word task (espeak-ng) and the ``asr-synth`` suite: data, split, prompt parity, WER, end to end.

Needs the Debian package espeak-ng (scripts/test-all.sh installs it); a missing program is a failure here,
not a skip, since the task cannot be generated without it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from omniserve.eval.asr_suite import METRIC, WerScore, word_edits
from omniserve.eval.datasets import ASR_BENCHMARK, stage_suite
from omniserve.eval.errors import InvalidSuite
from omniserve.eval.report import RunReport
from omniserve.eval.runner import EvalOptions, run_evaluation
from omniserve.eval.suites import load_suite
from omniserve.synth import write_synthetic
from omniserve.synth.speech_audio import Speaker, SpeechSynthesizerMissing
from omniserve.synth.tasks import SPOKEN_MAX_WORDS, SPOKEN_WORDS, spoken_in_test_split
from omniserve.train.data import read_conversations
from omniserve.train.features import limits_for, load_messages
from tests.conftest import RunningServer, start_server
from tests.test_train_support import run_cli

SERVED_NAME = "tiny-omni-demo"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("spoken") / "data"
    write_synthetic(folder, seed=0, train_size=40, test_size=12, tasks=("spoken",))
    return folder


# --------------------------------------------------------------------------- the task's data


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(spoken: Path, tmp_path: Path) -> None:
    again = write_synthetic(tmp_path / "again", seed=0, train_size=40, test_size=12, tasks=("spoken",)).output
    other = write_synthetic(tmp_path / "other", seed=1, train_size=4, test_size=2, tasks=("spoken",)).output

    assert _tree(again) == _tree(spoken)
    first = {k: v for k, v in _tree(spoken).items() if k in _tree(other)}
    assert first and all(_tree(other)[k] != v for k, v in first.items() if k.endswith(".wav"))


def test_lines_are_one_transcription_turn_with_a_16khz_clip_and_the_transcript(spoken: Path) -> None:
    import soundfile

    from omniserve.config import ServerConfig

    for split in ("train", "test"):
        for record in _lines(spoken / f"{split}.jsonl"):
            user, assistant = record["messages"]  # no system prompt, no earlier turns: what the endpoint sends
            audio, text = user["content"]
            assert text == {"type": "text", "text": ServerConfig().transcription_instruction}
            assert assistant == {"role": "assistant", "content": record["answer"]}
            words = record["answer"].split(" ")
            assert 1 <= len(words) <= SPOKEN_MAX_WORDS and set(words) <= set(SPOKEN_WORDS)
            clip = soundfile.info(spoken / audio["audio_url"]["url"])
            assert clip.samplerate == 16_000 and clip.channels == 1 and 0.5 < clip.duration < 4


def test_no_test_utterance_is_ever_heard_in_training(spoken: Path) -> None:
    def digits(record: dict[str, Any]) -> tuple[int, ...]:
        return tuple(SPOKEN_WORDS.index(w) for w in record["answer"].split())

    train = {digits(r) for r in _lines(spoken / "train.jsonl")}
    test = {digits(r) for r in _lines(spoken / "test.jsonl")}
    assert test and not train & test
    assert all(spoken_in_test_split(d) for d in test) and not any(spoken_in_test_split(d) for d in train)
    # the rule holds out whole sequences, never a word or a word's position
    for length in range(2, SPOKEN_MAX_WORDS + 1):
        sequences = list(product(range(len(SPOKEN_WORDS)), repeat=length))
        held_out = [s for s in sequences if spoken_in_test_split(s)]
        assert 0.1 < len(held_out) / len(sequences) < 0.2
        for position, word in product(range(length), range(len(SPOKEN_WORDS))):
            assert any(s[position] == word and not spoken_in_test_split(s) for s in sequences)


def test_a_missing_synthesiser_is_a_clear_error_naming_the_debian_package(tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "espeak-ng"

    with pytest.raises(SpeechSynthesizerMissing, match="Debian package espeak-ng"):
        write_synthetic(tmp_path / "lib", train_size=1, test_size=1, tasks=("spoken",), speaker=Speaker(str(missing)))
    assert not (tmp_path / "lib").exists()  # refused before anything is written

    result = run_cli("synth", "--output", tmp_path / "cli", "--task", "spoken", "--espeak-program", missing)
    assert result.exit_code == 2
    assert "apt-get install espeak-ng" in result.output and str(missing) in result.output
    # the tasks that need no speech do not need the program
    pitch = ("--train-size", "1", "--test-size", "0", "--task", "pitch")
    run = run_cli("synth", "--output", tmp_path / "pitch", *pitch, "--espeak-program", missing)
    assert run.exit_code == 0, run.output


# --------------------------------------------------------------------------- word error rate


@pytest.mark.parametrize(
    ("reference", "transcript", "edits", "words"),
    [
        ("three seven two", "three seven two", 0, 3),
        ("three seven two", " Three, SEVEN two.\n", 0, 3),  # case, punctuation and spaces are normalised away
        ("three seven two", "three seven", 1, 3),  # deletion
        ("three seven", "three one seven", 1, 2),  # insertion
        ("three seven", "three eight", 1, 2),  # substitution
        ("five", "", 1, 1),  # nothing heard
        ("five", "four four four", 3, 1),  # WER above 1
    ],
    ids=["exact", "normalised", "deletion", "insertion", "substitution", "empty", "insertions"],
)
def test_word_edits(reference: str, transcript: str, edits: int, words: int) -> None:
    assert word_edits(reference, transcript) == (edits, words)


def test_wer_is_corpus_level_and_the_score_is_one_minus_it_at_least_zero(spoken: Path) -> None:
    score = WerScore()
    score.add("a", "one two three", "one two three")
    score.add("b", "four", "five six")  # 1 substitution + 1 insertion over 1 word
    assert score.wer == pytest.approx(2 / 4) and score.score == pytest.approx(0.5)
    assert score.exact_rate == 0.5 and score.wrong == [("b", "four", "five six")]

    babble = WerScore()
    babble.add("c", "one", "two three four")
    assert babble.wer == 3.0 and babble.score == 0.0

    perfect = WerScore()  # a perfect transcriber of the test split
    for record in _lines(spoken / "test.jsonl"):
        perfect.add(record["id"], record["answer"], record["answer"])
    assert perfect.wer == 0.0 and perfect.score == 1.0 and perfect.exact_rate == 1.0


def test_the_suite_is_built_in_and_staged_with_absolute_audio(tmp_path: Path) -> None:
    suite = load_suite("asr-synth")
    assert (suite.format, suite.scoring, suite.subsets) == ("asr", "wer", ["spoken"])

    staged = stage_suite(suite, tmp_path / "staged", limit=2, cache_dir=tmp_path / "cache")

    assert staged.benchmark == ASR_BENCHMARK and staged.totals == {"spoken": 2}
    item = _lines(tmp_path / "staged" / "spoken_test.jsonl")[0]
    audio = item["messages"][-1]["content"][0]["input_audio"]
    assert audio["format"] == "wav" and Path(audio["data"]).is_absolute() and Path(audio["data"]).is_file()


def test_an_asr_suite_must_be_scored_by_wer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: x\nformat: asr\nscoring: exact\ngenerate: {generator: omni-synth}\nsubsets: [spoken]\n"
    )
    with pytest.raises(InvalidSuite, match="format 'asr' cannot be scored with 'exact'"):
        load_suite(bad)


# --------------------------------------------------------------------------- against the demo model


@pytest.fixture(scope="module")
def demo_server() -> Iterator[RunningServer]:
    """The demo model; transcripts capped at 16 tokens (an untrained one would talk for 448)."""
    import transformers  # noqa: F401  (imported before the app's two loader threads race for it)

    from omniserve.models.demo import demo_model_path

    server = start_server(demo_model_path(), name=SERVED_NAME, server={"transcription_max_tokens": 16})
    yield server
    server.stop()


def test_lines_train_on_exactly_what_the_transcription_endpoint_renders(
    spoken: Path, demo_server: RunningServer
) -> None:
    """The endpoint's own preparation of the upload is the training example up to where its labels start."""
    import torch

    from omniserve.protocol_audio import TranscriptionRequest
    from omniserve.server.serving_transcriptions import TranscriptionServing
    from omniserve.templates.training import IGNORE_INDEX, render_training_examples

    ctx = demo_server.app.state.ctx
    data = spoken / "test.jsonl"
    for conversation in read_conversations(data)[:3]:
        audio = spoken / "media" / "test" / f"{conversation.meta['id']}-0.wav"
        request = TranscriptionRequest(
            file=audio.read_bytes(), filename=audio.name, audio_format="wav", model=SERVED_NAME
        )
        (job,) = asyncio.run(TranscriptionServing(ctx).prepare(request))
        messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits_for(data)))
        (example,) = render_training_examples(ctx.renderer, messages, media).examples

        served = job.prompt.token_ids
        assert example.input_ids[: len(served)] == served
        first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert first_label == len(served)
        learned = ctx.renderer.tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
        assert learned.startswith(conversation.meta["answer"])
        for key, value in job.prompt.mm_inputs.items():
            assert torch.equal(example.mm_inputs[key], value), key


def test_the_suite_runs_against_the_demo_server_and_is_reported(demo_server: RunningServer, tmp_path: Path) -> None:
    options = EvalOptions(
        suites=["asr-synth"],
        url=f"{demo_server.base_url}/v1",
        limit=3,
        concurrency=2,
        output=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    report = run_evaluation(options)

    result = report.suites["asr-synth"]
    assert result.status == "complete", result.errors
    assert (result.benchmark, result.metric, result.samples.scored) == (ASR_BENCHMARK, METRIC, 3)
    assert set(result.subsets) == {"spoken", "spoken.wer", "spoken.exact"}
    wer = result.subsets["spoken.wer"].score
    assert isinstance(wer, float) and wer >= 0
    assert result.score == pytest.approx(max(0.0, 1 - wer)) and 0 <= result.score <= 1
    assert 0 <= result.subsets["spoken.exact"].score <= 1
    saved = RunReport.load(tmp_path / "run")
    assert saved.suites["asr-synth"].score == result.score
    assert f"| asr-synth | {METRIC} |" in (tmp_path / "run" / "report.md").read_text()
