"""Training examples from the serving renderer: the prompt a model learns from is the prompt it is served.

``render_training_example`` calls ``PromptRenderer.render_chat`` (the function every engine uses)
on the whole conversation, so ``input_ids`` and the processed media are made by the same chat
template, the same processor call and the same media settings as a served request. Labels come
from the template itself: the tokens it wraps in ``{% generation %}`` (every assistant turn) are
learned, everything else is ignored.

The template's mask is computed on the text before the processor expands media placeholders into
feature tokens (one ``<|IMAGE|>`` becomes one token per image patch group); ``expand_mask`` carries
it over to the expanded ids and checks, token by token, that both readings of the text agree.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from omniserve.media.loader import MediaItem
from omniserve.templates.conversation import HFMessage
from omniserve.templates.render import PromptRenderer, RenderOptions

#: Label of tokens the loss ignores (the value transformers' loss functions skip).
IGNORE_INDEX = -100

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


class LabelError(ValueError):
    """The conversation cannot be turned into labels (no assistant tokens, or a template we cannot mask)."""


@dataclass
class TrainingExample:
    """Model inputs for one conversation: ``labels`` is ``input_ids`` with non-assistant tokens ignored."""

    input_ids: list[int]
    labels: list[int]
    mm_inputs: dict[str, Any] = field(default_factory=dict)
    text: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def media_token_ids(renderer: PromptRenderer) -> frozenset[int]:
    """Ids of the placeholder tokens the processor repeats once per media feature."""
    ids: set[int] = set()
    for owner in (renderer.processor, renderer.tokenizer):
        for name in ("image_token", "video_token", "audio_token"):
            token = getattr(owner, name, None)
            if isinstance(token, str):
                token_id = renderer.tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != renderer.tokenizer.unk_token_id:
                    ids.add(token_id)
    return frozenset(ids)


def has_generation_markers(renderer: PromptRenderer) -> bool:
    """Whether the checkpoint's chat template marks assistant output with ``{% generation %}``."""
    return bool(_GENERATION_BLOCK.search(renderer.chat_template or ""))


def render_training_example(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    *,
    options: RenderOptions | None = None,
) -> TrainingExample:
    """Encode a whole conversation (ending with an assistant turn) for supervised training."""
    if not has_generation_markers(renderer):
        raise LabelError(
            "the model's chat template has no {% generation %} markers, so its assistant tokens cannot be "
            "told apart; add them around the assistant content in chat_template"
        )
    prompt = renderer.render_chat(messages, media, add_generation_prompt=False, options=options)
    text_ids, text_mask = renderer.assistant_text_mask(messages)
    mask = expand_mask(text_ids, text_mask, prompt.token_ids, media_token_ids(renderer))
    if not any(mask):
        raise LabelError("the conversation has no assistant tokens to learn from")
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(prompt.token_ids, mask, strict=True)]
    return TrainingExample(input_ids=prompt.token_ids, labels=labels, mm_inputs=prompt.mm_inputs, text=prompt.text)


def expand_mask(
    text_ids: list[int], text_mask: list[int], expanded_ids: list[int], media_ids: Collection[int]
) -> list[int]:
    """Carry a mask over ``text_ids`` onto ``expanded_ids``, where media placeholders repeat.

    Both lists must be the same tokens except that a run of one media placeholder may be longer in
    ``expanded_ids``; anything else means the two readings of the text differ, and is refused
    rather than guessed (wrong labels would silently train the wrong tokens).
    """
    out: list[int] = []
    i = j = 0
    while i < len(text_ids) and j < len(expanded_ids):
        token = text_ids[i]
        if token != expanded_ids[j]:
            break
        if token in media_ids:
            run_text = _run_length(text_ids, i)
            run_expanded = _run_length(expanded_ids, j)
            if run_expanded < run_text:
                break
            if any(text_mask[i : i + run_text]):
                raise LabelError("media inside an assistant turn cannot be trained on")
            out.extend([0] * run_expanded)
            i, j = i + run_text, j + run_expanded
            continue
        out.append(int(bool(text_mask[i])))
        i, j = i + 1, j + 1
    if i != len(text_ids) or j != len(expanded_ids):
        raise LabelError(
            f"the tokenizer and the processor read the rendered conversation differently at token {j} "
            f"(text token {i}); cannot place the labels"
        )
    return out


def _run_length(ids: list[int], start: int) -> int:
    end = start
    while end < len(ids) and ids[end] == ids[start]:
        end += 1
    return end - start
