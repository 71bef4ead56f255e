"""Prove that training prompts are served prompts: encode each conversation both ways and compare.

Training way: the conversation through ``render_training_examples`` (input ids + labels), with the
same mask strategy ``omniserve train`` uses: one example holding every turn's labels, or one per
assistant turn for templates that rewrite earlier turns (``per-turn``) or whose generation prompt is
not how they write a past turn (``served-prompt``). Serving way: for every assistant turn, the
messages before it go through exactly what ``POST /v1/chat/completions`` does (``to_hf_messages``
-> ``load_media`` -> ``render_chat`` with ``add_generation_prompt=True``, and the line's ``tools``
as a request with those tools passes them). Parity means, for every turn, in the example that
trains it:

1. the served prompt's token ids are the first tokens of the training ids;
2. the turn's labels start exactly where the served prompt ends (the model learns to continue
   what it will be given, from the first token it will have to produce);
3. the media tensors of the served prompt are the first rows of the training ones.

The first difference of each kind is reported with the tokens around it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from omniserve.config import MediaLimits
from omniserve.errors import OmniServeError
from omniserve.templates.render import PromptRenderer, RenderedPrompt
from omniserve.templates.training import (
    IGNORE_INDEX,
    TOKEN_ALIGNED_INPUTS,
    LabelError,
    MaskStrategy,
    TrainingExample,
    first_difference,
    render_training_examples,
    token_at,
    token_context,
)
from omniserve.train.data import Conversation, DataError
from omniserve.train.features import describe_strategies, load_messages, render_options


@dataclass(frozen=True)
class Difference:
    where: str  # FILE:LINE
    message_index: int  # the assistant message whose prompt differs
    description: str

    def __str__(self) -> str:
        return f"{self.where}: assistant turn messages[{self.message_index}]: {self.description}"


@dataclass
class ParityReport:
    conversations: int = 0
    turns: int = 0
    differences: list[Difference] = field(default_factory=list)
    strategies: dict[str, int] = field(default_factory=dict)  # mask strategy -> conversations checked with it

    @property
    def ok(self) -> bool:
        return not self.differences

    def describe_strategies(self) -> str:
        return describe_strategies(self.strategies)


def check_parity(
    renderer: PromptRenderer,
    conversations: list[Conversation],
    limits: MediaLimits,
    *,
    strategy: MaskStrategy = "auto",
) -> ParityReport:
    report = ParityReport()
    for conversation in conversations:
        report.conversations += 1
        report.turns += len(conversation.assistant_indices())
        used, differences = _check(renderer, conversation, limits, strategy)
        report.strategies[used] = report.strategies.get(used, 0) + 1
        report.differences.extend(differences)
    return report


def check_conversation(
    renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits, *, strategy: MaskStrategy = "auto"
) -> list[Difference]:
    return _check(renderer, conversation, limits, strategy)[1]


def _check(
    renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits, strategy: MaskStrategy
) -> tuple[str, list[Difference]]:
    """The strategy the conversation was encoded with, and each turn's first difference (if any)."""
    used, examples = _training_way(renderer, conversation, limits, strategy)
    differences = []
    for training in examples:
        label_starts = _label_run_starts(training.labels)
        aligned = len(label_starts) == len(training.turns)
        for turn, index in enumerate(training.turns):
            served = _serving_way(renderer, conversation, index, limits)
            problem = _compare(renderer, training, served, label_starts[turn] if aligned else None)
            if problem:
                differences.append(Difference(conversation.where, index, problem))
    return used, differences


def _training_way(
    renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits, strategy: MaskStrategy
) -> tuple[str, list[TrainingExample]]:
    messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits))
    try:
        labelled = render_training_examples(
            renderer, messages, media, strategy=strategy, options=render_options(conversation)
        )
    except (OmniServeError, LabelError) as exc:
        raise DataError(conversation.path, conversation.line, str(exc)) from None
    return labelled.strategy, labelled.examples


def _serving_way(
    renderer: PromptRenderer, conversation: Conversation, index: int, limits: MediaLimits
) -> RenderedPrompt:
    messages, media = asyncio.run(load_messages(conversation, conversation.messages[:index], limits))
    try:
        return renderer.render_chat(messages, media, add_generation_prompt=True, options=render_options(conversation))
    except OmniServeError as exc:
        raise DataError(conversation.path, conversation.line, f"serving the prefix fails: {exc}") from None


def _compare(
    renderer: PromptRenderer, training: TrainingExample, served: RenderedPrompt, label_start: int | None
) -> str | None:
    train_ids, serve_ids = training.input_ids, served.token_ids
    position = first_difference(serve_ids, train_ids)
    if position is not None:
        return (
            f"first differing token at position {position}: training {token_at(renderer, train_ids, position)} vs "
            f"serving {token_at(renderer, serve_ids, position)}\n"
            f"    training: {token_context(renderer, train_ids, position)}\n"
            f"    serving:  {token_context(renderer, serve_ids, position)}"
        )
    if label_start is None:
        return "the training labels do not form one span per assistant turn"
    if label_start != len(serve_ids):
        return (
            f"the served prompt ends at token {len(serve_ids)} but this turn's labels start at token {label_start}\n"
            f"    training: {token_context(renderer, train_ids, label_start)}"
        )
    for key, value in served.mm_inputs.items():
        mismatch = _media_mismatch(key, training.mm_inputs.get(key), value)
        if mismatch:
            return mismatch
    return None


def _label_run_starts(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


#: Processor outputs with one entry per token along dimension 1 and per image along dimension 2 (Mllama's
#: ``cross_attention_mask``, ``[1, tokens, images, tiles]``): the served prompt's are the first tokens' and images'.
_TOKEN_ROWS = frozenset({"cross_attention_mask"})


def _media_mismatch(key: str, training: Any, served: Any) -> str | None:
    import torch

    if not isinstance(served, torch.Tensor):
        return None
    if not isinstance(training, torch.Tensor):
        return f"the served prompt has media input {key!r}, the training example has none"
    if key in TOKEN_ALIGNED_INPUTS:  # one entry per token: the served prompt's are the first ones
        tokens = served.shape[-1]
        if training.shape[-1] < tokens or not torch.equal(training[..., :tokens], served):
            return f"per-token input {key!r} differs between training and serving"
        return None
    if key in _TOKEN_ROWS and served.ndim == training.ndim == 4:
        tokens, images = served.shape[1], served.shape[2]
        if training.shape[1] < tokens or training.shape[2] < images:
            return f"per-token input {key!r} is {tuple(served.shape)} served, {tuple(training.shape)} in training"
        if not torch.equal(training[:, :tokens, :images], served) or training[:, :tokens, images:].any():
            return f"per-token input {key!r} differs between training and serving"
        return None
    rows = served.shape[0]
    if training.shape[0] < rows or training.shape[1:] != served.shape[1:]:
        return f"media input {key!r} has shape {tuple(served.shape)} served, {tuple(training.shape)} in training"
    if not torch.equal(training[:rows], served):
        return f"media input {key!r} differs between training and serving"
    return None
