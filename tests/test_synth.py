"""Synthetic omni tasks: deterministic per seed, held-out test pairs, and media that really show the answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omniserve.config import MediaLimits
from omniserve.media import decode_audio, decode_image, decode_video
from omniserve.synth import TASKS, write_synthetic
from omniserve.synth.media import COLOURS
from omniserve.synth.tasks import TEST_PAIRS
from omniserve.train.data import read_conversations
from tests.test_train_support import run_cli


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth") / "s", seed=3, train_size=12, test_size=6).output


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(synth: Path, tmp_path: Path) -> None:
    again = write_synthetic(tmp_path / "again", seed=3, train_size=12, test_size=6).output
    other = write_synthetic(tmp_path / "other", seed=4, train_size=12, test_size=6).output

    assert _tree(again) == _tree(synth)
    assert len(_tree(other)) == len(_tree(synth))
    assert (other / "train.jsonl").read_bytes() != (synth / "train.jsonl").read_bytes()


def test_a_smaller_split_is_a_prefix_of_a_larger_one(synth: Path, tmp_path: Path) -> None:
    small = write_synthetic(tmp_path / "small", seed=3, train_size=0, test_size=2).output

    assert _records(small / "test.jsonl") == _records(synth / "test.jsonl")[: 2 * len(TASKS)]
    assert (small / "train.jsonl").read_text() == ""


def test_every_task_is_in_both_splits_as_valid_training_data(synth: Path) -> None:
    for split, size in (("train", 12), ("test", 6)):
        conversations = read_conversations(synth / f"{split}.jsonl")
        tasks = [c.meta["task"] for c in conversations]
        assert {t: tasks.count(t) for t in TASKS} == dict.fromkeys(TASKS, size)
        for conversation in conversations:
            assert conversation.messages[-1].role == "assistant"
            if conversation.meta["task"] != "tool_colour":
                assert conversation.messages[-1].content == conversation.meta["answer"]
                continue
            # the answer is a call (followed, in some training lines, by the tool's result and a reply)
            call = next(m for m in conversation.messages if getattr(m, "tool_calls", None)).tool_calls[0]
            expected = json.loads(conversation.meta["answer"])
            assert call.function.name == expected["name"]
            assert json.loads(call.function.arguments) == expected["arguments"]


def test_test_number_pairs_never_appear_in_training(synth: Path) -> None:
    def pairs(split: str) -> set[tuple[int, int]]:
        found = set()
        for record in _records(synth / f"{split}.jsonl"):
            for message in record["messages"]:
                if message["role"] == "user" and isinstance(message["content"], str):
                    digits = [int(c) for c in message["content"] if c.isdigit()]
                    found.add((min(digits), max(digits)))
        return found

    assert pairs("test") <= TEST_PAIRS
    assert not pairs("train") & TEST_PAIRS
    assert all(b - a >= 2 for a, b in TEST_PAIRS)  # each held-out order follows from training pairs


def _media(record: dict[str, Any], root: Path) -> list[tuple[str, bytes]]:
    parts = [m for m in record["messages"] if m["role"] == "user"][-1]["content"]  # a tool's result may follow it
    if isinstance(parts, str):
        return []
    return [(p["type"], (root / p[p["type"]]["url"]).read_bytes()) for p in parts if p["type"] != "text"]


def _dominant_colour(pixels: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    distances = ((pixels.reshape(-1, 1, 3).astype(np.float32) - palette[None]) ** 2).sum(-1)
    return names[int(np.bincount(distances.argmin(1), minlength=len(names)).argmax())]


def _direction(frames: np.ndarray) -> str:
    bright = frames.mean(-1) > 120
    ys, xs = zip(*(np.nonzero(f) for f in bright), strict=True)
    dx, dy = np.mean(xs[-1]) - np.mean(xs[0]), np.mean(ys[-1]) - np.mean(ys[0])
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _pitch(samples: np.ndarray, rate: int) -> str:
    peak = np.fft.rfftfreq(len(samples), 1 / rate)[np.abs(np.fft.rfft(samples)).argmax()]
    return "high" if peak > 800 else "low"


def test_the_media_decoded_by_the_server_show_the_answer(synth: Path) -> None:
    limits = MediaLimits()
    for record in _records(synth / "test.jsonl") + _records(synth / "train.jsonl"):
        task, answer, media = record["task"], record["answer"], _media(record, synth)
        if task == "colour":
            assert _dominant_colour(np.asarray(decode_image(media[0][1], limits))) == answer
        elif task == "motion":
            video = decode_video(media[0][1], limits)
            assert video.frames.shape[0] == 4  # 2 s at 2 fps
            assert _direction(video.frames) == answer
        elif task == "pitch":
            audio = decode_audio(media[0][1], limits)
            assert _pitch(audio.samples, audio.sample_rate) == answer
        elif task == "mixed":
            colour = _dominant_colour(np.asarray(decode_image(media[0][1], limits)))
            audio = decode_audio(media[1][1], limits)
            assert f"{colour} {_pitch(audio.samples, audio.sample_rate)}" == answer
        elif task in ("tool_colour", "json_colour"):
            colour = _dominant_colour(np.asarray(decode_image(media[0][1], limits)))
            answered = json.loads(answer)
            assert answered.get("arguments", answered) == {"colour": colour}
        elif task == "spoken":  # the words themselves: tests/test_asr_synth.py (the demo model learns them)
            audio = decode_audio(media[0][1], limits)
            assert audio.sample_rate == 16_000 and audio.duration > 0.5 and np.abs(audio.samples).max() > 0.2
        else:
            assert not media
            question = record["messages"][-2]["content"]
            assert answer == str(max(int(c) for c in question if c.isdigit()))


def test_cli_writes_the_splits_and_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    output = tmp_path / "out"

    first = run_cli("synth", "--output", output, "--train-size", "2", "--test-size", "1", "--task", "pitch")
    second = run_cli("synth", "--output", output)

    assert first.exit_code == 0, first.output
    assert "2 pitch" in first.output and "1 pitch" in first.output
    assert len((output / "train.jsonl").read_text().splitlines()) == 2
    assert second.exit_code == 2
    assert "exists and is not empty" in second.output
