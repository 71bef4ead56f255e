"""The Llama 3.1/3.2/3.3 JSON format: the whole reply is ``{"name": ..., "parameters": {...}}``.

Meta's templates list the tools as JSON and tell the model to "respond in the format {"name": function
name, "parameters": dictionary of argument name and its value}". A call is therefore not framed by tags:
the reply *is* the call, optionally after the ``<|python_tag|>`` marker, and several calls are written
one after the other separated by ``;``. So a reply that begins like a call (``{`` or the marker) is held
whole and read when it ends; one that begins otherwise is text and streams as it comes. A held reply
that is not a list of such objects (broken JSON, no name, text after the object) is given back as the
text it was: a JSON answer to a question is content, not a failed call.

Under an enforced call grammar (``incremental``) such a reply is certain to be calls, so it is not held:
each call is announced once its name is written and its arguments follow as the model writes them
(``streaming_args.CallSequence``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from omniserve.tools.base import CallMode, Event, ParsedCall, TextPiece, ToolCallParser, calls_format, schema_tag
from omniserve.tools.streaming_args import CallSequence

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = "; "
#: What the published templates say to the model; a template that says it teaches this format.
INSTRUCTION = '"parameters": dictionary of argument name and its value'
#: Incremental reading (``CallSequence``): the first call's opening, and from one call's arguments to the next's.
#: Each opening starts exactly as the grammar's trigger (``{"name": ``): under "auto" with strict tools the text
#: before a trigger is free, so a call is certain only from there.
_OPENING = r'\{"name": "(?P<name>[^"\\]+)"\s*,\s*"(?:parameters|arguments)"\s*:\s*'
_FIRST = re.compile(r"\s*" + _OPENING)
_FOLLOWING = re.compile(r"\s*\}\s*;\s*" + _OPENING)
#: What ends the last announced call (its brace, and the separator when cut before the next call's name).
_CALL_END = re.compile(r"\s*\}(?:\s*;)?")


def call_of(value: Any, *arguments_keys: str) -> ParsedCall | None:
    """A decoded JSON value as a call: an object with a non-empty string ``name`` and an object of arguments.

    The arguments are read from the first of ``arguments_keys`` present (none: no arguments); an
    argument object the model wrote already encoded as a string is decoded. Else None.
    """
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def _calls(body: str) -> list[ParsedCall] | None:
    """``body`` as one or more call objects separated by ``;`` (whitespace around them free), else None."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(body) and body[at].isspace():
            at += 1
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:
            return None
        call = call_of(value, "parameters", "arguments")
        if call is None:
            return None
        calls.append(call)
        rest = body[at:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        at = len(body) - len(rest) + 1


class Llama3JsonParser(ToolCallParser):
    """Text replies stream; a reply that starts like a call is held to its end and read whole."""

    NAME = "llama3_json"
    SPECIAL_TOKENS = (PYTHON_TAG,)  # a control token in Llama 3's tokenizer; calls parse with or without it

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None: not decided yet (only whitespace so far); "text" or "call"
        self._sequence: CallSequence | None = None  # incremental: the calls, read so far

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return INSTRUCTION in chat_template

    @classmethod
    def call_format(
        cls, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: CallMode, parallel: bool
    ) -> dict[str, Any] | None:
        """Each call as the templates render a past one (``{"name": "f", "parameters": {...}}``), joined by ``; ``.

        "auto" (a strict tool): text is free until ``{"name": ``, after which the call must match.
        """
        tags = [schema_tag(f'{{"name": {json.dumps(name)}, "parameters": ', schema, "}") for name, schema in functions]
        return calls_format(tags, mode=mode, parallel=parallel, separator=SEPARATOR, trigger='{"name": ')

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if not head or (len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head)):
                return []  # whitespace or a possible marker: nothing decided yet
            self._mode = "call" if head.startswith(("{", PYTHON_TAG)) else "text"
            if self._mode == "call" and self.incremental:  # the calls begin after the blanks and the marker
                start = len(self._buffer) - len(head) + (len(PYTHON_TAG) if head.startswith(PYTHON_TAG) else 0)
                self._sequence = CallSequence(_FIRST, _FOLLOWING, start=start)
        if self._mode == "call":
            return self._sequence.read(self._buffer) if self._sequence else []
        out, self._buffer = self._buffer, ""
        return [TextPiece(out)]

    def finish(self) -> list[Event]:
        held, self._buffer = self._buffer, ""
        sequence, self._sequence = self._sequence, None
        if sequence is not None and sequence.announced:
            # the calls stay calls (the last one cut short too); what follows them, but their closing, is text
            events = sequence.finish()
            rest = held[sequence.at :]
            closing = _CALL_END.match(rest)
            rest = rest[closing.end() :] if closing else rest
            return [*events, TextPiece(rest)] if rest.strip() else events
        if self._mode == "call":
            body = held.lstrip()
            body = body[len(PYTHON_TAG) :] if body.startswith(PYTHON_TAG) else body
            calls = _calls(body)
            if calls:
                return list(calls)
        return [TextPiece(held)] if held else []
