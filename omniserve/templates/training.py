"""Training examples from the serving renderer: the prompt a model learns from is the prompt it is served.

Every example is made by ``PromptRenderer.render_chat`` (the function every engine uses), so its
``input_ids`` and processed media come from the same chat template, the same processor call and
the same media settings as a served request. What differs between strategies is how the
assistant tokens (the labels) are found:

``markers``
    The template wraps assistant output in ``{% generation %}`` (the tiny and demo models do):
    the tokens it marks are learned. Used whenever the markers are there.
``prefix``
    Any other template (almost every published one). For each assistant turn the template
    renders the conversation up to the turn with the generation prompt (exactly what the server
    sends to get that turn) and the conversation through the turn; the turn's tokens are the
    difference. One example per conversation, labels on every assistant turn.
``per-turn``
    Templates that render a turn differently once later messages follow it (Qwen3 drops earlier
    ``<think>`` blocks from the history) have no single rendering that contains every turn as it
    was generated. Each assistant turn becomes its own example: the conversation through that
    turn, labels on that turn only; earlier turns appear as the template shows them to the model.

``auto`` picks ``markers`` when the template has them, else ``prefix`` for each conversation
whose prefix renderings are token prefixes of its whole rendering, else ``per-turn``.

Tools: ``options.tools`` (the request's function tools) reach the template in every strategy,
for the served prompts and the conversation alike, so a conversation with tools trains on the
prompt a request with the same tools is served. An assistant turn of tool calls is learned as the
template writes the calls (``<tool_call>{...}</tool_call>`` for Hermes/Qwen); a ``tool`` message
(a result) is input like a user turn, never learned.

Which tokens belong to a turn: everything the model must generate after the served prompt, up to
and including the first stop token (the tokenizer's eos or ``generation_config.json``'s, e.g.
``<|im_end|>``); what the template writes after it (the newline before the next turn) is never
generated, so never learned. A template whose turns contain no stop token: the turn's tokens less
trailing whitespace. Everything before the served prompt's end (a default system prompt the
template inserts, user turns, media) is ignored by the loss.

Masks are computed on the text before the processor expands media placeholders into feature
tokens (one ``<|IMAGE|>`` becomes one token per image patch group); ``expand_mask`` carries them
over to the expanded ids and checks, token by token, that both readings of the text agree.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from omniserve.media.loader import MediaItem
from omniserve.templates.conversation import HFMessage
from omniserve.templates.render import PromptRenderer, RenderedPrompt, RenderOptions

#: Label of tokens the loss ignores (the value transformers' loss functions skip).
IGNORE_INDEX = -100

#: ``auto`` or one of the strategies it resolves to (see the module docstring).
MaskStrategy = Literal["auto", "markers", "prefix", "per-turn"]

#: Processor outputs with one entry per token rather than per media feature (Qwen2-VL's modality type of
#: every token, which its multimodal positions need): batched and compared along the tokens, not stacked.
TOKEN_ALIGNED_INPUTS = frozenset({"mm_token_type_ids", "token_type_ids"})

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
_MEDIA_PART_TYPES = frozenset({"image", "video", "audio"})
_CONTEXT = 6


class LabelError(ValueError):
    """The conversation cannot be turned into labels (no assistant tokens, or a template we cannot mask)."""


@dataclass
class TrainingExample:
    """Model inputs for one example: ``labels`` is ``input_ids`` with non-assistant tokens ignored.

    ``turns`` lists the message indices of the assistant turns labelled here, in order (one label
    run each), so a parity check can compare each with the prompt the server builds for it.
    """

    input_ids: list[int]
    labels: list[int]
    mm_inputs: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    turns: list[int] = field(default_factory=list)
    strategy: str = "markers"

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class LabelledConversation:
    """A conversation's training examples and the strategy that made them (one of ``MaskStrategy`` but auto)."""

    strategy: str
    examples: list[TrainingExample]


@dataclass(frozen=True)
class _Turn:
    """One assistant turn at the text level: the conversation through it, and its labelled span."""

    index: int  # message index
    ids: list[int]  # the conversation rendered through this turn (no generation prompt)
    start: int  # where the served prompt ends: the first labelled token
    end: int  # one past the last labelled token


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


def render_training_examples(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    *,
    strategy: MaskStrategy = "auto",
    options: RenderOptions | None = None,
) -> LabelledConversation:
    """Encode a conversation for supervised training with ``strategy`` (``auto``: see the module docstring)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise LabelError("the conversation has no assistant tokens to learn from")
    if _tools(options) and not renderer.renders_tools():
        # the server refuses tools for such a model; training would teach calls to tools never shown
        raise LabelError("the conversation has tools, but the model's chat template does not render tools")
    markers = has_generation_markers(renderer)
    if strategy == "markers" or (strategy == "auto" and markers):
        return LabelledConversation("markers", [_marker_example(renderer, messages, media, options)])
    tools = _tools(options)
    turns = _render_turns(renderer, messages, tools)
    if strategy == "per-turn":
        return LabelledConversation("per-turn", _per_turn_examples(renderer, messages, media, turns, options))
    whole = renderer.template_token_ids(messages, add_generation_prompt=False, tools=tools)
    rewrite = _history_rewrite(renderer, whole, turns)
    if rewrite is None:
        return LabelledConversation("prefix", [_prefix_example(renderer, messages, media, whole, turns, options)])
    if strategy == "prefix":
        raise rewrite
    return LabelledConversation("per-turn", _per_turn_examples(renderer, messages, media, turns, options))


def render_training_example(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    *,
    options: RenderOptions | None = None,
) -> TrainingExample:
    """The whole conversation as one example (``markers``, else ``prefix``).

    For callers that need exactly one sequence per conversation; a template that rewrites earlier
    turns is refused with the turn and tokens where it does (``render_training_examples`` would
    fall back to one example per turn).
    """
    strategy: MaskStrategy = "markers" if has_generation_markers(renderer) else "prefix"
    return render_training_examples(renderer, messages, media, strategy=strategy, options=options).examples[0]


# --------------------------------------------------------------------------- strategies


def _marker_example(
    renderer: PromptRenderer, messages: list[HFMessage], media: list[MediaItem], options: RenderOptions | None
) -> TrainingExample:
    if not has_generation_markers(renderer):
        raise LabelError(
            "the model's chat template has no {% generation %} markers, so its assistant tokens cannot be "
            "told apart that way; use another mask strategy or add them around the assistant content"
        )
    prompt = renderer.render_chat(messages, media, add_generation_prompt=False, options=options)
    text_ids, text_mask = renderer.assistant_text_mask(messages, tools=_tools(options))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return _example(renderer, text_ids, text_mask, prompt, turns, "markers")


def _prefix_example(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    whole: list[int],
    turns: list[_Turn],
    options: RenderOptions | None,
) -> TrainingExample:
    mask = [0] * len(whole)
    for turn in turns:
        mask[turn.start : turn.end] = [1] * (turn.end - turn.start)
    prompt = renderer.render_chat(messages, media, add_generation_prompt=False, options=options)
    return _example(renderer, whole, mask, prompt, [t.index for t in turns], "prefix")


def _per_turn_examples(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    turns: list[_Turn],
    options: RenderOptions | None,
) -> list[TrainingExample]:
    total = _media_parts(messages)
    if total != len(media):
        raise LabelError(f"the conversation has {total} media parts but {len(media)} media items were given")
    examples = []
    for turn in turns:
        through = messages[: turn.index + 1]
        prompt = renderer.render_chat(
            through, media[: _media_parts(through)], add_generation_prompt=False, options=options
        )
        mask = [0] * turn.start + [1] * (turn.end - turn.start) + [0] * (len(turn.ids) - turn.end)
        examples.append(_example(renderer, turn.ids, mask, prompt, [turn.index], "per-turn"))
    return examples


def _example(
    renderer: PromptRenderer,
    text_ids: list[int],
    text_mask: list[int],
    prompt: RenderedPrompt,
    turns: list[int],
    strategy: str,
) -> TrainingExample:
    mask = expand_mask(text_ids, text_mask, prompt.token_ids, media_token_ids(renderer))
    if not any(mask):
        raise LabelError("the conversation has no assistant tokens to learn from")
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(prompt.token_ids, mask, strict=True)]
    return TrainingExample(
        input_ids=prompt.token_ids,
        labels=labels,
        mm_inputs=prompt.mm_inputs,
        text=prompt.text,
        turns=turns,
        strategy=strategy,
    )


# --------------------------------------------------------------------------- prefix renderings


def _tools(options: RenderOptions | None) -> list[dict[str, Any]] | None:
    """The tools the template is given, exactly as ``render_chat`` gives them (None: no tools)."""
    return list(options.tools) if options is not None and options.tools else None


def _render_turns(
    renderer: PromptRenderer, messages: list[HFMessage], tools: list[dict[str, Any]] | None = None
) -> list[_Turn]:
    """Each assistant turn's span, from the served prompt and the conversation through the turn.

    Refuses a turn whose served prompt is not a token prefix of the conversation through it: the
    model would learn to continue text it is never given (a generation prompt that opens the answer
    differently, or a tokenizer that merges across the boundary). No strategy can train that turn.
    """
    stops = renderer.stop_token_ids
    turns: list[_Turn] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise LabelError(
                "messages[0] is an assistant turn with nothing before it: no request leads to it, "
                "so there is no served prompt to place its labels after"
            )
        prompt = renderer.template_token_ids(messages[:index], add_generation_prompt=True, tools=tools)
        through = renderer.template_token_ids(messages[: index + 1], add_generation_prompt=False, tools=tools)
        position = first_difference(prompt, through)
        if position is not None:
            raise LabelError(
                f"assistant turn messages[{index}]: the prompt the server sends for this turn is not a token "
                f"prefix of the conversation rendered through it, so its labels cannot start where serving "
                f"stops; first difference at {_position(renderer, prompt, position)}: "
                f"served {token_at(renderer, prompt, position)} vs trained {token_at(renderer, through, position)}\n"
                f"    served:  {token_context(renderer, prompt, position)}\n"
                f"    trained: {token_context(renderer, through, position)}"
            )
        end = _turn_end(renderer, through, len(prompt), stops)
        if end == len(prompt):
            raise LabelError(f"assistant turn messages[{index}]: the chat template renders no tokens for it")
        turns.append(_Turn(index, through, len(prompt), end))
    return turns


def _turn_end(renderer: PromptRenderer, ids: list[int], start: int, stops: Collection[int]) -> int:
    """One past the turn's last token: its first stop token, else its last non-whitespace token."""
    for position in range(start, len(ids)):
        if ids[position] in stops:
            return position + 1
    end = len(ids)
    while end > start and not renderer.tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end


def _history_rewrite(renderer: PromptRenderer, whole: list[int], turns: list[_Turn]) -> LabelError | None:
    """Why one rendering of the whole conversation cannot carry every turn's labels, or None when it can."""
    previous_end = 0
    for turn in turns:
        trained = turn.ids[: turn.end]
        position = first_difference(trained, whole)
        if position is not None:
            return LabelError(
                f"assistant turn messages[{turn.index}]: the chat template renders the conversation through this "
                f"turn differently once later messages follow it (it rewrites earlier turns); first difference at "
                f"{_position(renderer, trained, position)}: through this turn {token_at(renderer, trained, position)} "
                f"vs whole conversation {token_at(renderer, whole, position)}\n"
                f"    through the turn: {token_context(renderer, trained, position)}\n"
                f"    whole:            {token_context(renderer, whole, position)}"
            )
        if turn.start < previous_end:
            return LabelError(
                f"assistant turn messages[{turn.index}]: its served prompt ends at token {turn.start}, inside the "
                f"previous turn's labels (which end at token {previous_end})"
            )
        previous_end = turn.end
    return None


def _media_parts(messages: list[HFMessage]) -> int:
    """How many media items ``messages`` refer to (the placeholders ``to_hf_messages`` writes, in order)."""
    return sum(
        1
        for m in messages
        if isinstance(m["content"], list)
        for part in m["content"]
        if part.get("type") in _MEDIA_PART_TYPES
    )


# --------------------------------------------------------------------------- token diagnostics


def first_difference(prefix: list[int], ids: list[int]) -> int | None:
    """Where ``prefix`` stops being a prefix of ``ids`` (None: it is one)."""
    for i, token in enumerate(prefix):
        if i >= len(ids) or ids[i] != token:
            return i
    return None


def _position(renderer: PromptRenderer, ids: list[int], position: int) -> str:
    """``token N``, saying so when media placeholders before it will each become many tokens."""
    media = media_token_ids(renderer)
    expanded = any(token in media for token in ids[:position])
    return f"token {position}" + (" (each media placeholder before it counted once)" if expanded else "")


def token_piece(renderer: PromptRenderer, token_id: int) -> str:
    """A token as readable text: its decoded string, or its vocabulary entry when it is part of a character."""
    text = renderer.tokenizer.decode([token_id])
    if "\ufffd" in text:
        text = renderer.tokenizer.convert_ids_to_tokens(token_id)
    return repr(text)


def token_at(renderer: PromptRenderer, ids: list[int], position: int) -> str:
    if position >= len(ids):
        return "(end of sequence)"
    return f"{token_piece(renderer, ids[position])} (id {ids[position]})"


def token_context(renderer: PromptRenderer, ids: list[int], position: int) -> str:
    """The tokens around ``position``, the one at it marked ``>>...<<``."""
    lo, hi = max(0, position - _CONTEXT), min(len(ids), position + _CONTEXT + 1)
    pieces = [token_piece(renderer, t) for t in ids[lo:hi]]
    if lo <= position < hi:
        pieces[position - lo] = f">>{pieces[position - lo]}<<"
    else:
        pieces.append(">>(end)<<")
    return ("... " if lo > 0 else "") + " ".join(pieces) + (" ..." if hi < len(ids) else "")


# --------------------------------------------------------------------------- media expansion


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
        aligned = _expand_mask_by_diff(text_ids, text_mask, expanded_ids, media_ids)
        if aligned is not None:
            return aligned
        raise LabelError(
            f"the tokenizer and the processor read the rendered conversation differently at token {j} "
            f"(text token {i}); cannot place the labels"
        )
    return out


def _expand_mask_by_diff(
    text_ids: list[int], text_mask: list[int], expanded_ids: list[int], media_ids: Collection[int]
) -> list[int] | None:
    """The mask for processors that expand a placeholder into more than a run of it (Gemma 3 wraps its
    soft tokens in ``<start_of_image>``/``<end_of_image>`` and blank lines, Idefics3 writes a tile grid).

    The two readings are diffed; every region where they differ must hold a media token on one side
    and no labelled token on the text side, and every labelled token must be read identically. None
    when that does not hold (the caller refuses).
    """
    from difflib import SequenceMatcher

    out = [0] * len(expanded_ids)
    matcher = SequenceMatcher(None, text_ids, expanded_ids, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out[j1:j2] = [int(bool(m)) for m in text_mask[i1:i2]]
            continue
        if any(text_mask[i1:i2]):
            return None
        if not any(t in media_ids for t in (*text_ids[max(i1 - 1, 0) : i2 + 1], *expanded_ids[j1:j2])):
            return None
    return out


def _run_length(ids: list[int], start: int) -> int:
    end = start
    while end < len(ids) and ids[end] == ids[start]:
        end += 1
    return end - start
