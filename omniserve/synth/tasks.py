"""Small tasks with known answers, one per modality plus a mixed one, generated from a seed.

Each task draws one example from a random generator: media (encoded files), a question and the
exact answer. They are what a tiny model can learn on a laptop CPU in minutes and what proves a
served model really reads its image, clip or sound: the answer cannot be guessed from the text.

- ``colour``: an image -> its dominant colour name (8 colours).
- ``motion``: a clip of a bar -> the direction it moves (left/right/up/down).
- ``pitch``: a tone -> ``high`` or ``low``.
- ``larger``: two digits in the text -> the larger one. The pairs are split between train and test
  by a fixed rule, so no test pair was seen in training: the model must have learned to compare.
- ``mixed``: an image and a tone -> ``"<colour> <pitch>"`` (needs both modalities).
- ``tool_colour``: an image and a ``report_colour(colour)`` function tool -> a call of it with the
  dominant colour (the tools travel with the example, as a request's ``tools``).
- ``json_colour``: an image -> ``{"colour": "<colour>"}``, the JSON schema given as the example's
  ``response_format`` (what a client sends to have the reply constrained to it).
- ``spoken``: 1-3 digit words (``zero``..``nine``) spoken by espeak-ng -> the transcript, asked exactly as
  ``/v1/audio/transcriptions`` asks (the server's default instruction, no system prompt). Word sequences are
  split between train and test by a fixed rule (``spoken_in_test_split``): no test utterance is heard in training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from omniserve.synth.media import (
    COLOURS,
    DIRECTIONS,
    PITCHES,
    VIDEO_FPS,
    colour_image,
    image_bytes,
    moving_bar,
    mp4_bytes,
    tone,
    wav_bytes,
)
from omniserve.synth.speech_audio import DEFAULT_SPEAKER, Speaker

Split = Literal["train", "test"]
MediaKind = Literal["image", "video", "audio"]
_EXTENSIONS: dict[str, str] = {"PNG": "png", "JPEG": "jpg"}


@dataclass(frozen=True)
class MediaFile:
    kind: MediaKind
    data: bytes
    extension: str


@dataclass(frozen=True)
class ToolCallAnswer:
    """The call a tool task expects: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One question: media first (in order), then the question text; ``answer`` is the exact reply.

    A tool task also carries the request's ``tools`` and the expected ``call`` (its ``answer`` is the
    call as JSON, ``{"name": ..., "arguments": {...}}``); a JSON task its ``response_format``.
    """

    task: str
    question: str
    answer: str
    media: tuple[MediaFile, ...] = field(default_factory=tuple)
    tools: tuple[dict[str, Any], ...] = ()
    call: ToolCallAnswer | None = None
    response_format: dict[str, Any] | None = None


def _image(rng: np.random.Generator, colour: str) -> MediaFile:
    """PNG or JPEG, half and half: users send both, and JPEG shifts colours slightly."""
    fmt = _pick(rng, ("PNG", "JPEG"))
    return MediaFile("image", image_bytes(colour_image(rng, colour), fmt), _EXTENSIONS[fmt])


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


_COLOUR_QUESTIONS = (
    "What is the dominant colour of this image? Answer with one word.",
    "Which colour covers most of the picture?",
    "Name the main colour of the image.",
)
_MOTION_QUESTIONS = (
    "Which way does the bar move: left, right, up or down?",
    "In which direction is the bar moving?",
    "Does the bar move left, right, up or down?",
)
_PITCH_QUESTIONS = (
    "Is this tone high or low?",
    "Is the pitch of the sound high or low?",
    "Listen: high or low tone?",
)
_LARGER_QUESTIONS = (
    "Which number is larger: {a} or {b}?",
    "Which is bigger, {a} or {b}? Reply with the number.",
    "Give the larger of {a} and {b}.",
)
_MIXED_QUESTIONS = (
    "What colour is the picture, and is the tone high or low? Answer as: colour pitch.",
    "Name the image's main colour and whether the sound is high or low (colour pitch).",
)


def colour_task(rng: np.random.Generator, split: Split) -> Example:
    colour = _pick(rng, list(COLOURS))
    image = _image(rng, colour)
    return Example("colour", _pick(rng, _COLOUR_QUESTIONS), colour, (image,))


def motion_task(rng: np.random.Generator, split: Split) -> Example:
    direction = _pick(rng, DIRECTIONS)
    video = MediaFile("video", mp4_bytes(moving_bar(rng, direction), VIDEO_FPS), "mp4")
    return Example("motion", _pick(rng, _MOTION_QUESTIONS), direction, (video,))


def pitch_task(rng: np.random.Generator, split: Split) -> Example:
    pitch = _pick(rng, PITCHES)
    audio = MediaFile("audio", wav_bytes(tone(rng, pitch)), "wav")
    return Example("pitch", _pick(rng, _PITCH_QUESTIONS), pitch, (audio,))


#: Digit pairs (smaller first) asked only in the test split. None is adjacent: the order of a held-out
#: pair must follow from training pairs (4 < 5 < 6 answers 4 vs 6), while nothing in the training data
#: says whether 3 < 4 if that pair is never shown.
TEST_PAIRS: frozenset[tuple[int, int]] = frozenset({(1, 3), (4, 6), (7, 9), (0, 5), (2, 7), (3, 8), (0, 6), (1, 9)})


def in_test_split(a: int, b: int) -> bool:
    """Whether the pair (in either order) is reserved for testing."""
    return (min(a, b), max(a, b)) in TEST_PAIRS


def larger_task(rng: np.random.Generator, split: Split) -> Example:
    while True:
        a, b = (int(v) for v in rng.choice(10, size=2, replace=False))
        if in_test_split(a, b) == (split == "test"):
            break
    question = _pick(rng, _LARGER_QUESTIONS).format(a=a, b=b)
    return Example("larger", question, str(max(a, b)))


def mixed_task(rng: np.random.Generator, split: Split) -> Example:
    colour, pitch = _pick(rng, list(COLOURS)), _pick(rng, PITCHES)
    image = _image(rng, colour)
    audio = MediaFile("audio", wav_bytes(tone(rng, pitch)), "wav")
    return Example("mixed", _pick(rng, _MIXED_QUESTIONS), f"{colour} {pitch}", (image, audio))


#: The colour of ``tool_colour`` and ``json_colour``: one of the image task's names, nothing else.
COLOUR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": list(COLOURS)}},
    "required": ["colour"],
    "additionalProperties": False,
}
#: ``strict``, as OpenAI recommends for function calling: once the model opens a call (``<tool_call>`` in the
#: demo's Hermes format) the server holds the call to the function's schema. The model still decides whether
#: to call and with which colour; a 2-layer byte-level model is spared counting closing braces, which is
#: where its unconstrained calls failed (docs/training.md).
REPORT_COLOUR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "report_colour",
        "description": "Report the dominant colour of the image.",
        "parameters": COLOUR_SCHEMA,
        "strict": True,
    },
}
COLOUR_RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "colour_answer", "schema": COLOUR_SCHEMA, "strict": True},
}
_TOOL_QUESTIONS = (
    "Report the dominant colour of this image.",
    "Call the function with the main colour of the picture.",
    "Use the tool to report which colour covers most of the image.",
)
_JSON_QUESTIONS = (
    "What is the dominant colour of this image? Answer in JSON.",
    "Give the main colour of the picture as a JSON object.",
    "Which colour covers most of the image? Reply with JSON.",
)


def tool_colour_task(rng: np.random.Generator, split: Split) -> Example:
    colour = _pick(rng, list(COLOURS))
    image = _image(rng, colour)
    call = ToolCallAnswer("report_colour", {"colour": colour})
    answer = json.dumps({"name": call.name, "arguments": call.arguments})
    return Example("tool_colour", _pick(rng, _TOOL_QUESTIONS), answer, (image,), tools=(REPORT_COLOUR_TOOL,), call=call)


def json_colour_task(rng: np.random.Generator, split: Split) -> Example:
    colour = _pick(rng, list(COLOURS))
    image = _image(rng, colour)
    answer = json.dumps({"colour": colour})
    return Example("json_colour", _pick(rng, _JSON_QUESTIONS), answer, (image,), response_format=COLOUR_RESPONSE_FORMAT)


TASKS: dict[str, Callable[[np.random.Generator, Split], Example]] = {
    "colour": colour_task,
    "motion": motion_task,
    "pitch": pitch_task,
    "larger": larger_task,
    "mixed": mixed_task,
    # appended, not inserted: a task's seed stream is its position here, so the others' data stay the same
    "tool_colour": tool_colour_task,
    "json_colour": json_colour_task,
}


#: The words of the ``spoken`` task: a vocabulary a 1.5M-parameter byte-level model can learn to transcribe.
SPOKEN_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPOKEN_MAX_WORDS = 3
#: Tasks asked as ``/v1/audio/transcriptions`` asks: their audio is spoken by a ``Speaker`` and their
#: conversation is the endpoint's, one user turn (the audio, then the instruction) with no system prompt.
TRANSCRIPTION_TASKS: frozenset[str] = frozenset({"spoken"})


def transcription_instruction() -> str:
    """The server's default transcription instruction (``ServerConfig``), so training asks what serving asks."""
    from omniserve.config import ServerConfig

    return str(ServerConfig.model_fields["transcription_instruction"].default)


def spoken_in_test_split(digits: tuple[int, ...] | list[int]) -> bool:
    """Whether the word sequence is reserved for testing: 2+ words whose digit sum plus length is a multiple of 7.

    About one sequence in seven of each length from two up; single words are all training. Every word
    still occurs at every position in training, so a held-out sequence is new only as a whole.
    """
    return len(digits) >= 2 and (sum(digits) + len(digits)) % 7 == 0


def spoken_task(rng: np.random.Generator, split: Split, speaker: Speaker = DEFAULT_SPEAKER) -> Example:
    while True:
        count = int(rng.integers(1, SPOKEN_MAX_WORDS + 1))
        digits = [int(d) for d in rng.integers(len(SPOKEN_WORDS), size=count)]
        if spoken_in_test_split(digits) == (split == "test"):
            break
    transcript = " ".join(SPOKEN_WORDS[d] for d in digits)
    audio = MediaFile("audio", wav_bytes(speaker.say(rng, transcript)), "wav")
    return Example("spoken", transcription_instruction(), transcript, (audio,))


TASKS["spoken"] = spoken_task  # appended: a task's seed stream is its position in TASKS
