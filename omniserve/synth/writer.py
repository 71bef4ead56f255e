"""Write synthetic tasks as training data: ``train.jsonl``, ``test.jsonl`` and the media files.

Each line is an OpenAI-style conversation (the format ``omniserve train`` reads) plus ``id``,
``task`` and ``answer`` fields for scoring. A tool task's line carries its ``tools`` (rendered into
the prompt by training, sent as the request's by the scorer) and ends in an assistant turn of
``tool_calls``; in some training lines the tool's result and a short reply follow (results are
input, never learned). A JSON task's line carries its ``response_format``. A transcription task's line
(``spoken``) is exactly the conversation ``/v1/audio/transcriptions`` renders: one user turn (the audio,
then the server's instruction), no system prompt or earlier turns. Media parts name their
files relative to the JSONL file. Every example draws from its own generator, seeded by (seed, split, task, index): the
output does not depend on the other sizes asked for, and the two splits never share a stream.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omniserve.synth.speech_audio import DEFAULT_SPEAKER, Speaker
from omniserve.synth.tasks import TASKS, TRANSCRIPTION_TASKS, Example, Split, larger_task

SYSTEM_PROMPT = "You are a helpful assistant."
#: Share of examples that start with a system prompt / (train only) with an earlier question and answer.
SYSTEM_SHARE = 0.25
MULTI_TURN_SHARE = 0.15
#: Share of tool-task training examples that go on after the call: the tool's result, then a short reply.
TOOL_RESULT_SHARE = 0.15
TOOL_RESULT = '{"status": "recorded"}'
TOOL_REPLY = "Reported."
_SPLIT_IDS: dict[Split, int] = {"train": 0, "test": 1}
_PART_TYPES = {"image": "image_url", "video": "video_url", "audio": "audio_url"}


@dataclass(frozen=True)
class SynthSummary:
    output: Path
    counts: dict[str, dict[str, int]]  # split -> task -> examples


def write_synthetic(
    output: Path,
    *,
    seed: int = 0,
    train_size: int = 400,
    test_size: int = 100,
    tasks: tuple[str, ...] = tuple(TASKS),
    speaker: Speaker = DEFAULT_SPEAKER,
) -> SynthSummary:
    """Write ``train_size`` and ``test_size`` examples of each task under ``output`` (which must be empty).

    ``speaker`` runs espeak-ng for the spoken task; ``SpeechSynthesizerMissing`` (a ``ValueError``) before
    anything is written when that task is asked for and the program is not there.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if TRANSCRIPTION_TASKS.intersection(tasks):
        speaker.resolve()
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    counts: dict[str, dict[str, int]] = {}
    for split, size in (("train", train_size), ("test", test_size)):
        counts[split] = _write_split(output, split, size, seed, tasks, speaker)  # type: ignore[arg-type]
    return SynthSummary(output=output, counts=counts)


def _write_split(
    output: Path, split: Split, size: int, seed: int, tasks: tuple[str, ...], speaker: Speaker
) -> dict[str, int]:
    media_dir = output / "media" / split
    media_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with open(output / f"{split}.jsonl", "w", encoding="utf-8") as file:
        for index in range(size):
            for task in tasks:  # interleaved, so a prefix of the file covers every task
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], list(TASKS).index(task), index])
                record = _record(rng, task, split, f"{task}-{split}-{index:05d}", media_dir, output, speaker)
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[task] += 1
    return dict(counts)


def _record(
    rng: np.random.Generator, task: str, split: Split, ident: str, media_dir: Path, root: Path, speaker: Speaker
) -> dict:
    transcription = task in TRANSCRIPTION_TASKS  # asked as the endpoint asks: nothing before the one user turn
    example = TASKS[task](rng, split, speaker) if transcription else TASKS[task](rng, split)  # type: ignore[call-arg]
    messages: list[dict[str, Any]] = []
    if not transcription and rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    if not transcription and split == "train" and rng.random() < MULTI_TURN_SHARE:
        earlier = larger_task(rng, split)  # every assistant turn is trained on, not only the last
        messages += [{"role": "user", "content": earlier.question}, {"role": "assistant", "content": earlier.answer}]
    messages.append({"role": "user", "content": _user_content(example, ident, media_dir, root)})
    record: dict[str, Any] = {"id": ident, "task": task, "answer": example.answer}
    if example.call is None:
        messages.append({"role": "assistant", "content": example.answer})
    else:
        call_id = f"call_{ident.replace('-', '_')}"
        arguments = json.dumps(example.call.arguments)
        function = {"name": example.call.name, "arguments": arguments}
        calls = [{"id": call_id, "type": "function", "function": function}]
        messages.append({"role": "assistant", "tool_calls": calls})
        if split == "train" and rng.random() < TOOL_RESULT_SHARE:
            messages.append({"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT})
            messages.append({"role": "assistant", "content": TOOL_REPLY})
    if example.tools:
        record["tools"] = list(example.tools)
    if example.response_format is not None:
        record["response_format"] = example.response_format
    record["messages"] = messages
    return record


def _user_content(example: Example, ident: str, media_dir: Path, root: Path) -> str | list[dict[str, Any]]:
    if not example.media:
        return example.question
    parts: list[dict[str, Any]] = []
    for i, media in enumerate(example.media):
        path = media_dir / f"{ident}-{i}.{media.extension}"
        path.write_bytes(media.data)
        part_type = _PART_TYPES[media.kind]
        parts.append({"type": part_type, part_type: {"url": path.relative_to(root).as_posix()}})
    parts.append({"type": "text", "text": example.question})
    return parts
