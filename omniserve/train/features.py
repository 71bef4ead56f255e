"""Conversations -> training samples, through the server's own media loader and prompt renderer.

Media are fetched and decoded by ``media.load_media`` under the same ``MediaLimits`` a server uses
(local files allowed only under the data file's folder), then rendered by
``templates.training.render_training_examples``. Nothing here formats a prompt. A conversation
gives one sample, or one per assistant turn when its template rewrites earlier turns (the
``per-turn`` mask strategy); ``EncodedData.strategies`` counts which strategy each conversation got.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omniserve.config import MediaLimits
from omniserve.errors import ModelLoadError, OmniServeError
from omniserve.media.loader import MediaItem, load_media
from omniserve.protocol import ChatMessage
from omniserve.templates.conversation import HFMessage, to_hf_messages
from omniserve.templates.render import PromptRenderer, RenderOptions
from omniserve.templates.training import (
    LabelError,
    MaskStrategy,
    render_training_example,
    render_training_examples,
)
from omniserve.train.data import Conversation, DataError

TooLong = Literal["skip", "fail"]


@dataclass
class Sample:
    """One encoded conversation, ready for a collator."""

    line: int
    input_ids: list[int]
    labels: list[int]
    mm_inputs: dict[str, Any] = field(default_factory=dict)
    turns: tuple[int, ...] = ()  # message indices of the assistant turns labelled in this sample

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class LabelledSamples:
    """A conversation's samples and the mask strategy that made them."""

    strategy: str
    samples: list[Sample]


@dataclass
class EncodedData:
    samples: list[Sample]
    skipped_too_long: list[int] = field(default_factory=list)  # line numbers
    strategies: dict[str, int] = field(default_factory=dict)  # mask strategy -> conversations encoded with it

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def describe_strategies(self) -> str:
        """One line for the user: how the assistant tokens were found, per number of conversations."""
        return describe_strategies(self.strategies)


def describe_strategies(strategies: dict[str, int]) -> str:
    """E.g. ``assistant labels: prefix renderings (12 conversations), per-turn examples (3 conversations)``."""
    names = {
        "markers": "the template's {% generation %} markers",
        "prefix": "prefix renderings",
        "per-turn": "per-turn examples (the template rewrites earlier turns)",
        "served-prompt": "served-prompt examples (each turn on the exact prompt the server sends for it)",
    }
    parts = [
        f"{names.get(name, name)} ({count} conversation{'s' if count != 1 else ''})"
        for name, count in strategies.items()
    ]
    return "assistant labels: " + (", ".join(parts) if parts else "none")


def limits_for(data_file: Path, base: MediaLimits | None = None) -> MediaLimits:
    """The server's limits, with local media allowed under the data file's folder (paths are relative to it)."""
    base = base or MediaLimits()
    return base.model_copy(update={"allowed_local_media_path": Path(data_file).resolve().parent})


async def load_messages(
    conversation: Conversation, messages: list[ChatMessage], limits: MediaLimits
) -> tuple[list[HFMessage], list[MediaItem]]:
    """The serving path's first half: protocol messages -> HF messages + decoded media."""
    hf_messages, sources = to_hf_messages(messages)
    try:
        media = await load_media(sources, limits)
    except OmniServeError as exc:
        raise DataError(conversation.path, conversation.line, _located(exc)) from None
    return hf_messages, media


def render_options(conversation: Conversation) -> RenderOptions:
    """What a request with this conversation's tools renders with (the server's default media settings)."""
    return RenderOptions(tools=conversation.tools)


def encode_conversation(renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits) -> Sample:
    """The whole conversation as one sample (markers or prefix masks); see ``render_training_example``."""
    hf_messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits))
    try:
        example = render_training_example(renderer, hf_messages, media, options=render_options(conversation))
    except (OmniServeError, LabelError) as exc:
        raise DataError(conversation.path, conversation.line, _located(exc)) from None
    return Sample(
        conversation.line,
        example.input_ids,
        example.labels,
        trim_audio_padding(example.mm_inputs, keep=keeps_audio_padding(renderer)),
        tuple(example.turns),
    )


def encode_labelled(
    renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits, *, strategy: MaskStrategy = "auto"
) -> LabelledSamples:
    """The conversation's samples under ``strategy`` (one, or one per assistant turn for ``per-turn``)."""
    hf_messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits))
    try:
        labelled = render_training_examples(
            renderer, hf_messages, media, strategy=strategy, options=render_options(conversation)
        )
    except (OmniServeError, LabelError) as exc:
        raise DataError(conversation.path, conversation.line, _located(exc)) from None
    keep = keeps_audio_padding(renderer)
    samples = [
        Sample(conversation.line, e.input_ids, e.labels, trim_audio_padding(e.mm_inputs, keep=keep), tuple(e.turns))
        for e in labelled.examples
    ]
    return LabelledSamples(labelled.strategy, samples)


def encode_all(
    renderer: PromptRenderer,
    conversations: list[Conversation],
    limits: MediaLimits,
    *,
    max_length: int | None = None,
    too_long: TooLong = "skip",
    progress: Callable[[int], None] | None = None,
    strategy: MaskStrategy = "auto",
) -> EncodedData:
    """Encode every conversation; samples over ``max_length`` tokens are skipped (counted) or, with ``fail``, raise."""
    data = EncodedData(samples=[])
    for conversation in conversations:
        labelled = encode_labelled(renderer, conversation, limits, strategy=strategy)
        data.strategies[labelled.strategy] = data.strategies.get(labelled.strategy, 0) + 1
        skipped = False
        for sample in labelled.samples:
            if max_length is None or len(sample) <= max_length:
                data.samples.append(sample)
                continue
            if too_long == "fail":
                what = (
                    f"assistant turn messages[{sample.turns[0]}], trained on its own,"
                    if labelled.strategy == "per-turn"
                    else "the conversation"
                )
                raise DataError(
                    conversation.path,
                    conversation.line,
                    f"{what} has {len(sample)} tokens, more than --max-length {max_length}",
                )
            skipped = True
        if skipped:
            data.skipped_too_long.append(conversation.line)
        if progress is not None:
            progress(1)
    if not data.samples:
        raise DataError(conversations[0].path, 0, f"every conversation is longer than --max-length {max_length}")
    return data


def keeps_audio_padding(renderer: PromptRenderer) -> bool:
    """Whether the renderer's checkpoint belongs to a family whose audio encoder needs the padded clip.

    The family says so (``Family.keeps_audio_padding``); it is found from the ``config.json`` of the
    folder the processor was loaded from. No folder (a processor built in memory) or no family: trim.
    """
    folder = getattr(renderer.tokenizer, "name_or_path", None)
    return bool(folder) and _family_keeps_audio_padding(str(folder))


@functools.lru_cache(maxsize=8)
def _family_keeps_audio_padding(folder: str) -> bool:
    from omniserve.models.families import check_supported

    try:
        family = check_supported(Path(folder))
    except ModelLoadError:
        return False  # an unknown architecture is refused where the model loads, with its own message
    return family is not None and family.keeps_audio_padding


def trim_audio_padding(mm_inputs: dict[str, Any], *, keep: bool = False) -> dict[str, Any]:
    """Drop the silent tail Whisper-style extractors pad every clip with (to 30 s), keeping the mask's frames.

    The audio encoder reads only the frames ``feature_attention_mask`` marks, so the result is the
    same input, at a fraction of the memory (a 1 s clip keeps 100 of 3000 frames). ``keep``: the
    family's encoder requires the padded length (``keeps_audio_padding``); the input goes as it is.
    """
    mask = mm_inputs.get("feature_attention_mask")
    features = mm_inputs.get("input_features")
    if keep or mask is None or features is None:
        return mm_inputs
    keep = int(mask.sum(-1).max())
    # clone(): both are views whose storage is far larger (the mask strides over a per-sample mask of the
    # padded waveform, 1.9 MB per clip); a view would keep all of it alive for the whole run.
    return {
        **mm_inputs,
        "input_features": features[..., :keep].clone(),
        "feature_attention_mask": mask[..., :keep].clone(),
    }


def _located(exc: Exception) -> str:
    param = getattr(exc, "param", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{param}: {message}" if param else message
