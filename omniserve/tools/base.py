"""What every tool-call parser yields, and the shape of a parser: fed text as it streams, told when it ends.

The gateway streams replies, so a parser is incremental: ``feed`` takes the next piece of text and
returns what can be said already (plain text, or a whole call), holding back text that may still
become part of a call. A non-streamed reply goes through the same parser in one piece
(``parse_all``), so a streamed and a non-streamed reply of the same text carry the same calls.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: How a request's ``tool_choice`` constrains the reply: calls only ("required"), exactly one call of one
#: function ("named"), or free text whose calls must match their schemas ("auto" with strict tools).
CallMode = Literal["required", "named", "auto"]


@dataclass(frozen=True)
class TextPiece:
    """Reply text outside any call: the message's ``content``."""

    text: str


@dataclass(frozen=True)
class ParsedCall:
    """One complete call; ``arguments`` is a JSON object encoded as a string, as OpenAI sends it.

    ``opened``: the call was already announced (``CallStart``) and its arguments given in ``ArgumentsPiece``s,
    whose concatenation ``arguments`` is; this event only closes it.
    """

    name: str
    arguments: str
    opened: bool = False


@dataclass(frozen=True)
class CallStart:
    """A call whose function is known and whose arguments follow as ``ArgumentsPiece``s (incremental parsers)."""

    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    """The next characters of the open call's arguments, as the model writes them."""

    text: str


Event = TextPiece | ParsedCall | CallStart | ArgumentsPiece


class ToolCallParser(abc.ABC):
    """Finds calls in one choice's reply. One instance per choice: it keeps that choice's state."""

    #: The name ``--tool-call-parser`` takes.
    NAME: str
    #: Whether calls are announced as soon as their function is written and their arguments streamed as they
    #: come (``CallStart``, ``ArgumentsPiece``s, then the closing ``ParsedCall``) rather than given whole. Only
    #: safe where the call grammar is enforced: an announced call cannot turn back into text. Formats that
    #: cannot stream ignore it.
    incremental: bool = False
    #: The markers of this format that tokenizers may hold as special (control) tokens. Engines drop special
    #: tokens from the text, so a request with tools keeps exactly these (``SamplingParams.keep_special``):
    #: without them the parser would never see a call begin.
    SPECIAL_TOKENS: tuple[str, ...] = ()

    @classmethod
    @abc.abstractmethod
    def matches(cls, chat_template: str) -> bool:
        """Whether a chat template teaches the model this format (the parser is then chosen by itself)."""

    @abc.abstractmethod
    def feed(self, text: str) -> list[Event]:
        """The events the text so far makes certain; text that may still start or continue a call is held."""

    @abc.abstractmethod
    def finish(self) -> list[Event]:
        """The reply ended: whatever was held, as text (an unfinished call is not a call)."""

    @classmethod
    def call_format(
        cls, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: CallMode, parallel: bool
    ) -> dict[str, Any] | None:
        """An xgrammar structural tag whose sentences are calls in this format, arguments matching each schema.

        ``functions``: (name, parameters schema) of the tools a call may use (for "named", the one).
        The grammar of a format belongs with its parser: what one writes, the other reads back.
        None: this format has no grammar yet (the gateway then refuses to force calls with a 400).
        """
        return None

    @classmethod
    def call_id(cls) -> str:
        """A new call's id, in a shape this format's templates accept when the client sends the call back.

        OpenAI's shape (``call_`` and 24 characters) unless a format's templates insist on another.
        """
        return f"call_{uuid.uuid4().hex[:24]}"

    def parse_all(self, text: str) -> list[Event]:
        """A whole reply at once (non-streamed), through the same path as a stream."""
        return self.feed(text) + self.finish()


def schema_tag(begin: str, schema: dict[str, Any], end: str) -> dict[str, Any]:
    """One call in a structural tag: a fixed opening (the name is part of it), arguments matching ``schema``."""
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def calls_format(
    tags: list[dict[str, Any]], *, mode: CallMode, parallel: bool, separator: str, trigger: str
) -> dict[str, Any]:
    """The structural tag forcing calls as ``mode`` asks: the one named call; one or more calls joined by
    ``separator`` ("required"; one when not ``parallel``); or free text until ``trigger`` opens a call that
    must then match ("auto" with strict tools)."""
    if mode == "named":
        fmt: dict[str, Any] = tags[0]
    elif mode == "required":
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True}
        fmt["stop_after_first"] = not parallel
    else:
        fmt = {"type": "triggered_tags", "triggers": [trigger], "tags": tags, "stop_after_first": not parallel}
    return {"type": "structural_tag", "format": fmt}
