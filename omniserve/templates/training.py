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

``served-prompt``
    Templates whose generation prompt is not how they write a past assistant turn (LLaVA-OneVision
    and LLaVA-NeXT-Video write ``<|im_start|>assistant \n<text>`` in the history but serve
    ``<|im_start|>assistant\n``): the served prompt is not a prefix of any rendering of the
    conversation, so no rendering can carry the labels. Each assistant turn becomes its own
    example built the way serving builds it: the ids ``render_chat`` makes for the messages before
    the turn with the generation prompt (media included: exactly what the server sends), then the
    answer as the model generates it (the turn's text tokenized on its own, as detokenization reads
    it back) and the stop token the server stops on; labels on the answer and the stop token only.
    Earlier turns appear as the template writes them in the history, as serving shows them to the
    model for later turns. A turn of tool calls is learned as the template writes its body (found
    by rendering the same turn with a sentinel text in place of its content: what surrounds the
    sentinel is the turn's header and end); a template whose turn cannot be cut that way, or that
    does not write the calls at all (LLaVA-OneVision's), is refused for that turn. The stop token:
    the first one the template writes after the turn's text, else the tokenizer's eos. (A reasoning
    block is part of an assistant message's text in the request format, so it is learned as written.)

``auto`` picks ``markers`` when the template has them, else ``prefix`` for each conversation
whose prefix renderings are token prefixes of its whole rendering, else ``per-turn``. Before
either, it renders each assistant turn's served prompt and the conversation through the turn: when
some served prompt is not a token prefix of that rendering and, past the longest text the two
share, the served prompt has nothing but whitespace left (a generation prompt that spells the
assistant header with other whitespace, or a tokenizer that merges its last token with the
answer's first), the conversation gets ``served-prompt``. ``per-turn`` is kept for the other case,
where every served prompt is a prefix of the conversation through its turn and only later messages
change how an earlier turn is written (Qwen3 dropping ``<think>``): its examples keep the turn as
the template writes it. A served prompt that adds visible text the history never has (``Sure! ``)
is not trained through silently: ``prefix`` and ``per-turn`` refuse the turn, ``markers`` keep
their labels (and ``check-parity`` reports the difference); ``served-prompt``, asked for, trains it.

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
MaskStrategy = Literal["auto", "markers", "prefix", "per-turn", "served-prompt"]

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
    if strategy == "markers":
        return LabelledConversation("markers", [_marker_example(renderer, messages, media, options)])
    tools = _tools(options)
    renderings = _renderings(renderer, messages, tools)
    if strategy == "served-prompt" or (strategy == "auto" and _served_prompt_needed(renderer, renderings)):
        examples = _served_prompt_examples(renderer, messages, media, renderings, options)
        return LabelledConversation("served-prompt", examples)
    if strategy == "auto" and markers:
        return LabelledConversation("markers", [_marker_example(renderer, messages, media, options)])
    turns = _render_turns(renderer, renderings)
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


def _check_media_count(messages: list[HFMessage], media: list[MediaItem]) -> None:
    """Each example takes the media of its own turns by count: the parts and the items must match one to one."""
    total = _media_parts(messages)
    if total != len(media):
        raise LabelError(f"the conversation has {total} media parts but {len(media)} media items were given")


def _per_turn_examples(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    turns: list[_Turn],
    options: RenderOptions | None,
) -> list[TrainingExample]:
    _check_media_count(messages, media)
    examples = []
    for turn in turns:
        through = messages[: turn.index + 1]
        prompt = renderer.render_chat(
            through, media[: _media_parts(through)], add_generation_prompt=False, options=options
        )
        mask = [0] * turn.start + [1] * (turn.end - turn.start) + [0] * (len(turn.ids) - turn.end)
        examples.append(_example(renderer, turn.ids, mask, prompt, [turn.index], "per-turn"))
    return examples


def _served_prompt_examples(
    renderer: PromptRenderer,
    messages: list[HFMessage],
    media: list[MediaItem],
    renderings: list[_Rendering],
    options: RenderOptions | None,
) -> list[TrainingExample]:
    """One example per assistant turn: the served prompt's ids, then the answer and its stop token (learned)."""
    _check_media_count(messages, media)
    examples = []
    for rendering in renderings:
        before = messages[: rendering.index]
        served = renderer.render_chat(
            before, media[: _media_parts(before)], add_generation_prompt=True, options=options
        )
        answer = [*_answer_ids(renderer, messages, rendering.index, options), _stop_token(renderer, rendering)]
        examples.append(
            TrainingExample(
                input_ids=served.token_ids + answer,
                labels=[IGNORE_INDEX] * served.num_tokens + answer,
                mm_inputs=_extend_token_inputs(served.mm_inputs, served.num_tokens, len(answer)),
                text=(served.text or "") + renderer.tokenizer.decode(answer),
                turns=[rendering.index],
                strategy="served-prompt",
            )
        )
    return examples


def _answer_ids(
    renderer: PromptRenderer, messages: list[HFMessage], index: int, options: RenderOptions | None
) -> list[int]:
    """The turn's answer as the model generates it: its text tokenized on its own (what detokenizing reads back).

    A turn of tool calls: the body the template writes for it (its text and the calls, as the model writes
    them for the server's tool parser to read back).
    """
    message = messages[index]
    unknown = sorted(set(message) - {"role", "content", "tool_calls"})
    if unknown:
        raise LabelError(
            f"assistant turn messages[{index}]: mask strategy served-prompt cannot tell how the model writes "
            f"its {', '.join(unknown)} (only text and tool calls are learned this way)"
        )
    if message.get("tool_calls"):
        text = _template_body(renderer, messages, index, options)
    else:
        text = _message_text(message, index)
    return list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])


def _message_text(message: HFMessage, index: int) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    kinds = sorted({part.get("type", "?") for part in content if part.get("type") != "text"})
    if kinds:
        raise LabelError(
            f"assistant turn messages[{index}]: it holds {', '.join(kinds)} parts, which the model does not generate"
        )
    return "".join(part["text"] for part in content)


#: Text no template writes by itself: a turn rendered with it as content shows the turn's header and end.
_SENTINEL = "OMNISERVE_TURN_BODY_SENTINEL"


def _template_body(
    renderer: PromptRenderer, messages: list[HFMessage], index: int, options: RenderOptions | None
) -> str:
    """What the template writes for turn ``index`` between its header and its end (content and tool calls).

    The turn is the rendering through it less the rendering before it; the header and the end are what
    the template writes around ``_SENTINEL`` given as the same turn's only content. Refused when the
    template does not write the turn that way (then the model's writing of the calls is not known).
    """

    def text(conversation: list[HFMessage]) -> str:
        return renderer.render_chat(conversation, [], add_generation_prompt=False, options=options).text or ""

    message = messages[index]
    content: Any = _SENTINEL if isinstance(message["content"], str) else [{"type": "text", "text": _SENTINEL}]
    before, through = text(messages[:index]), text(messages[: index + 1])
    probe = text([*messages[:index], {"role": "assistant", "content": content}])
    head, found, tail = probe[len(before) :].partition(_SENTINEL)
    segment = through[len(before) :]
    if not (
        found
        and through.startswith(before)
        and probe.startswith(before)
        and segment.startswith(head)
        and segment.endswith(tail)
        and len(segment) >= len(head) + len(tail)
    ):
        raise LabelError(
            f"assistant turn messages[{index}]: mask strategy served-prompt cannot find how the chat template "
            f"writes this turn's tool calls (its rendering of the turn is not a header, the calls and an end "
            f"as for a text turn), so the tokens the model generates for them are not known"
        )
    body = segment[len(head) : len(segment) - len(tail)]
    missing = [call["function"]["name"] for call in message["tool_calls"] if call["function"]["name"] not in body]
    if missing:
        raise LabelError(
            f"assistant turn messages[{index}]: the chat template does not write this turn's tool calls "
            f"({', '.join(missing)} missing from its rendering), so mask strategy served-prompt cannot teach them"
        )
    return body


def _stop_token(renderer: PromptRenderer, rendering: _Rendering) -> int:
    """The token that ends the answer: the first stop token the template writes after it, else the eos."""
    stops = renderer.stop_token_ids
    start = rendering.difference if rendering.difference is not None else len(rendering.prompt)
    for token in rendering.through[start:]:
        if token in stops:
            return token
    eos = renderer.tokenizer.eos_token_id
    if isinstance(eos, int):
        return eos
    if stops:
        return min(stops)
    raise LabelError(
        f"assistant turn messages[{rendering.index}]: the model has no stop token (no eos in the tokenizer or "
        f"generation_config.json), so an answer cannot be taught to end"
    )


#: Processor outputs with one row per token along dimension 1 (Mllama's ``cross_attention_mask``,
#: ``[1, tokens, images, tiles]``): a token after the last image attends to what the token before it does.
_TOKEN_ROWS = frozenset({"cross_attention_mask"})


def _extend_token_inputs(mm_inputs: dict[str, Any], tokens: int, added: int) -> dict[str, Any]:
    """The served prompt's media inputs for ``added`` more text tokens (the answer and its stop token).

    Per-token entries grow as the processor would write them for text after the prompt: modality type
    0 (text) for ``TOKEN_ALIGNED_INPUTS``, the last token's row for ``_TOKEN_ROWS``.
    """
    if not mm_inputs:
        return mm_inputs
    import torch

    out = dict(mm_inputs)
    for key, value in mm_inputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in TOKEN_ALIGNED_INPUTS and value.shape[-1] == tokens:
            out[key] = torch.cat([value, value.new_zeros((*value.shape[:-1], added))], dim=-1)
        elif key in _TOKEN_ROWS and value.ndim == 4 and value.shape[1] == tokens:
            out[key] = torch.cat([value, value[:, -1:].expand(-1, added, -1, -1)], dim=1)
    return out


def _served_prompt_needed(renderer: PromptRenderer, renderings: list[_Rendering]) -> bool:
    """Whether ``auto`` gives the conversation ``served-prompt`` (module docstring).

    Some served prompt is not a token prefix of the conversation through its turn, and each such prompt,
    past the longest text it shares with that rendering, holds only whitespace.
    """
    skewed = [r for r in renderings if r.difference is not None]
    return bool(skewed) and all(not _served_tail(renderer, r).strip() for r in skewed)


def _served_tail(renderer: PromptRenderer, rendering: _Rendering) -> str:
    """The served prompt's text past the longest text it shares with the conversation rendered through the turn."""
    served = renderer.tokenizer.decode(rendering.prompt)
    through = renderer.tokenizer.decode(rendering.through)
    shared = next((i for i, (a, b) in enumerate(zip(served, through, strict=False)) if a != b), None)
    return served[min(len(served), len(through)) if shared is None else shared :]


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


@dataclass(frozen=True)
class _Rendering:
    """One assistant turn's two template renderings (media placeholders not expanded)."""

    index: int  # message index
    prompt: list[int]  # the messages before the turn with the generation prompt: what the server sends
    through: list[int]  # the conversation through the turn, no generation prompt
    difference: int | None  # where ``prompt`` stops being a token prefix of ``through`` (None: it is one)


def _renderings(
    renderer: PromptRenderer, messages: list[HFMessage], tools: list[dict[str, Any]] | None
) -> list[_Rendering]:
    renderings = []
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
        renderings.append(_Rendering(index, prompt, through, first_difference(prompt, through)))
    return renderings


def _render_turns(renderer: PromptRenderer, renderings: list[_Rendering]) -> list[_Turn]:
    """Each assistant turn's span, from the served prompt and the conversation through the turn.

    Refuses a turn whose served prompt is not a token prefix of the conversation through it: the
    model would learn to continue text it is never given (a generation prompt that opens the answer
    differently, or a tokenizer that merges across the boundary). No rendering of the conversation
    can carry that turn's labels; ``served-prompt`` builds its example the way serving does instead.
    """
    stops = renderer.stop_token_ids
    turns: list[_Turn] = []
    for rendering in renderings:
        index, prompt, through, position = rendering.index, rendering.prompt, rendering.through, rendering.difference
        if position is not None:
            raise LabelError(
                f"assistant turn messages[{index}]: the prompt the server sends for this turn is not a token "
                f"prefix of the conversation rendered through it, so its labels cannot start where serving "
                f"stops; first difference at {_position(renderer, prompt, position)}: "
                f"served {token_at(renderer, prompt, position)} vs trained {token_at(renderer, through, position)}\n"
                f"    served:  {token_context(renderer, prompt, position)}\n"
                f"    trained: {token_context(renderer, through, position)}\n"
                f"    (mask strategy served-prompt trains each turn after exactly the prompt the server sends)"
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
