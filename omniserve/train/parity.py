"""Prove that training prompts are served prompts: encode each conversation both ways and compare.

Training way: the whole conversation through ``render_training_example`` (input ids + labels).
Serving way: for every assistant turn, the messages before it go through exactly what
``POST /v1/chat/completions`` does (``to_hf_messages`` -> ``load_media`` -> ``render_chat`` with
``add_generation_prompt=True``). Parity means, for every turn:

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
from omniserve.templates.training import IGNORE_INDEX, LabelError, TrainingExample, render_training_example
from omniserve.train.data import Conversation, DataError
from omniserve.train.features import load_messages

_CONTEXT = 6


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

    @property
    def ok(self) -> bool:
        return not self.differences


def check_parity(renderer: PromptRenderer, conversations: list[Conversation], limits: MediaLimits) -> ParityReport:
    report = ParityReport()
    for conversation in conversations:
        report.conversations += 1
        report.turns += len(conversation.assistant_indices())
        report.differences.extend(check_conversation(renderer, conversation, limits))
    return report


def check_conversation(renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits) -> list[Difference]:
    training = _training_way(renderer, conversation, limits)
    label_starts = _label_run_starts(training.labels)
    assistant = conversation.assistant_indices()
    differences = []
    for turn, index in enumerate(assistant):
        served = _serving_way(renderer, conversation, index, limits)
        start = label_starts[turn] if len(label_starts) == len(assistant) else None
        problem = _compare(renderer, training, served, start)
        if problem:
            differences.append(Difference(conversation.where, index, problem))
    return differences


def _training_way(renderer: PromptRenderer, conversation: Conversation, limits: MediaLimits) -> TrainingExample:
    messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits))
    try:
        return render_training_example(renderer, messages, media)
    except (OmniServeError, LabelError) as exc:
        raise DataError(conversation.path, conversation.line, str(exc)) from None


def _serving_way(
    renderer: PromptRenderer, conversation: Conversation, index: int, limits: MediaLimits
) -> RenderedPrompt:
    messages, media = asyncio.run(load_messages(conversation, conversation.messages[:index], limits))
    try:
        return renderer.render_chat(messages, media, add_generation_prompt=True)
    except OmniServeError as exc:
        raise DataError(conversation.path, conversation.line, f"serving the prefix fails: {exc}") from None


def _compare(
    renderer: PromptRenderer, training: TrainingExample, served: RenderedPrompt, label_start: int | None
) -> str | None:
    train_ids, serve_ids = training.input_ids, served.token_ids
    position = _first_difference(train_ids, serve_ids)
    if position is not None:
        return (
            f"first differing token at position {position}: training {_token(renderer, train_ids, position)} vs "
            f"serving {_token(renderer, serve_ids, position)}\n"
            f"    training: {_context(renderer, train_ids, position)}\n"
            f"    serving:  {_context(renderer, serve_ids, position)}"
        )
    if label_start is None:
        return "the training labels do not form one span per assistant turn"
    if label_start != len(serve_ids):
        return (
            f"the served prompt ends at token {len(serve_ids)} but this turn's labels start at token {label_start}\n"
            f"    training: {_context(renderer, train_ids, label_start)}"
        )
    for key, value in served.mm_inputs.items():
        mismatch = _media_mismatch(key, training.mm_inputs.get(key), value)
        if mismatch:
            return mismatch
    return None


def _first_difference(train_ids: list[int], serve_ids: list[int]) -> int | None:
    """Where the served prompt stops being a prefix of the training ids (None: it is one)."""
    for i, token in enumerate(serve_ids):
        if i >= len(train_ids) or train_ids[i] != token:
            return i
    return None


def _label_run_starts(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def _media_mismatch(key: str, training: Any, served: Any) -> str | None:
    import torch

    if not isinstance(served, torch.Tensor):
        return None
    if not isinstance(training, torch.Tensor):
        return f"the served prompt has media input {key!r}, the training example has none"
    rows = served.shape[0]
    if training.shape[0] < rows or training.shape[1:] != served.shape[1:]:
        return f"media input {key!r} has shape {tuple(served.shape)} served, {tuple(training.shape)} in training"
    if not torch.equal(training[:rows], served):
        return f"media input {key!r} differs between training and serving"
    return None


def _token(renderer: PromptRenderer, ids: list[int], position: int) -> str:
    if position >= len(ids):
        return "(end of sequence)"
    return f"{_piece(renderer, ids[position])} (id {ids[position]})"


def _piece(renderer: PromptRenderer, token_id: int) -> str:
    return repr(renderer.tokenizer.convert_ids_to_tokens(token_id))


def _context(renderer: PromptRenderer, ids: list[int], position: int) -> str:
    lo, hi = max(0, position - _CONTEXT), min(len(ids), position + _CONTEXT + 1)
    pieces = [_piece(renderer, t) for t in ids[lo:hi]]
    if lo <= position < hi:
        pieces[position - lo] = f">>{pieces[position - lo]}<<"
    else:
        pieces.append(">>(end)<<")
    return ("... " if lo > 0 else "") + " ".join(pieces) + (" ..." if hi < len(ids) else "")
