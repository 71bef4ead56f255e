"""Separating a reply's reasoning from its answer, for templates that teach ``<think>...</think>`` blocks.

Qwen3, QwQ and DeepSeek-R1-style checkpoints write their reasoning between ``<think>`` and ``</think>``
before the answer. OpenAI-compatible servers return it apart, as ``reasoning_content`` (vLLM's name,
which agent frameworks read), so the answer in ``content`` is what the user sees and what tool-call
parsing reads. Where the block starts is the template's business: Qwen3's generation prompt leaves
the model to open it, DeepSeek-R1's opens it in the prompt, and Qwen3 with ``enable_thinking: false``
renders an empty closed block in the prompt. So the splitter starts inside the block exactly when the
rendered prompt ends inside one, which is read from the prompt itself, never guessed from the model.

Incremental, like the tool parsers: ``feed`` returns what is certain so far and holds back text that may
be the start of a tag; ``finish`` flushes. A streamed and a non-streamed reply split the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OPEN, CLOSE = "<think>", "</think>"

Kind = Literal["reasoning", "content"]


@dataclass(frozen=True)
class Piece:
    kind: Kind
    text: str


def template_thinks(chat_template: str) -> bool:
    """Whether a chat template teaches reasoning blocks (the splitter is then on by default)."""
    return OPEN in chat_template and CLOSE in chat_template


def prompt_opens_block(prompt_text: str) -> bool:
    """Whether the rendered prompt ends inside an open ``<think>`` block (the reply starts as reasoning)."""
    last_open = prompt_text.rfind(OPEN)
    return last_open != -1 and prompt_text.rfind(CLOSE) < last_open


class ReasoningSplitter:
    """Splits one choice's reply into reasoning and content pieces as its text streams in.

    States: ``start`` (only whitespace so far: an opening tag may still come), ``reasoning`` (inside
    the block, until ``</think>``) and ``content`` (everything after, tags included: only a block at
    the start of the reply is reasoning).
    """

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self._state: Literal["start", "reasoning", "content"] = "reasoning" if starts_in_reasoning else "start"
        self._held = ""
        self._after_block = False  # newlines right after </think> separate the block; they are not content
        self.saw_block = starts_in_reasoning  # whether the reply had a reasoning block at all

    def feed(self, text: str) -> list[Piece]:
        self._held += text
        pieces: list[Piece] = []
        while self._held:
            if self._state == "start":
                stripped = self._held.lstrip()
                if stripped.startswith(OPEN):
                    self._held = stripped[len(OPEN) :].lstrip("\n")
                    self._state, self.saw_block = "reasoning", True
                    continue
                if not stripped or OPEN.startswith(stripped):
                    break  # whitespace, or the start of an opening tag: wait for more
                self._state = "content"
                continue
            if self._state == "reasoning":
                index = self._held.find(CLOSE)
                if index == -1:
                    keep = _partial_suffix(self._held, CLOSE)
                    pieces.append(Piece("reasoning", self._held[: len(self._held) - keep]))
                    self._held = self._held[len(self._held) - keep :]
                    break
                pieces.append(Piece("reasoning", self._held[:index]))
                self._held = self._held[index + len(CLOSE) :]
                self._state, self._after_block = "content", True
                continue
            if self._after_block:
                self._held = self._held.lstrip("\n")
                if not self._held:
                    break
                self._after_block = False
            pieces.append(Piece("content", self._held))
            self._held = ""
        return _merge(pieces)

    def finish(self) -> list[Piece]:
        """The reply ended: what was held is reasoning inside an unclosed block, content otherwise."""
        held, self._held = self._held, ""
        if not held or (self._after_block and not held.strip("\n")):
            return []
        return [Piece("reasoning" if self._state == "reasoning" else "content", held)]


def split(text: str, *, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole reply as (reasoning or None when there was no block, content)."""
    splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning)
    pieces = [*splitter.feed(text), *splitter.finish()]
    reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
    content = "".join(p.text for p in pieces if p.kind == "content")
    return (reasoning.strip("\n") if splitter.saw_block else None), content


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``tag`` (it may complete with more text)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if merged and merged[-1].kind == piece.kind:
            merged[-1] = Piece(piece.kind, merged[-1].text + piece.text)
        elif piece.text:
            merged.append(piece)
    return merged
