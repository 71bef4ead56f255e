"""Mistral's ``[TOOL_CALLS]`` formats: v3 ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``, v11 ``name[ARGS]{...}``.

The templates of Mistral 7B v0.3, Nemo and Small list the tools inside ``[AVAILABLE_TOOLS]`` and render
a past call as ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments", "id"}`` objects; the
model answers the same way. Text before the marker streams as it comes; from the marker on the reply is
held until the array closes, then read whole. An array that does not parse as calls is given back as the
text it was, marker included. ``[TOOL_CALLS]`` (and v11's ``[ARGS]``, ``[CALL_ID]``) are control tokens that
engines decoding with ``skip_special_tokens`` drop: the parser names them (``SPECIAL_TOKENS``) and requests
with tools keep them in the text. An engine that cannot keep them still drops the marker, so a reply that
*opens* with a JSON array of objects is read as calls too.

The newer templates (Mistral Small 3.2, Magistral, Devstral: the v11+ tokenizers) write each call as
``[TOOL_CALLS]`` + the function's name (+ ``[CALL_ID]`` and an id in a history) + ``[ARGS]`` + the
arguments object, one such block per call. Which form a template teaches shows in how it renders a past
call: with ``[ARGS]`` it is v11, else v3. Both forms share the text handling; only the reading of what
follows the marker differs.

Under an enforced call grammar (``incremental``) a call is not held: it is announced once its name is
written and its arguments follow as the model writes them (``streaming_args.CallSequence``), each form
described by three patterns: its first call's opening, what leads from one call's arguments to the next
one's, and what closes the block.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from typing import Any

from omniserve.tools.base import CallMode, Event, ParsedCall, TextPiece, ToolCallParser, calls_format, schema_tag
from omniserve.tools.llama3_json import call_of
from omniserve.tools.streaming_args import JSON_OPENING, CallSequence

START = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
#: What a call id is made of: Mistral's templates refuse a history whose call ids are not 9 of these.
_ID_CHARS = string.ascii_letters + string.digits
#: A function name as OpenAI allows one (``[A-Za-z0-9_-]{1,64}``; dots too, as some clients send them).
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
#: What ends the last announced call of an array cut short (its brace, and a comma or the array's bracket).
_CALL_END = re.compile(r"\s*\}(?:\s*[,\]])?")


def _partial_start(text: str) -> int:
    """Where a suffix of ``text`` that could still grow into ``[TOOL_CALLS]`` begins (``len(text)``: none)."""
    for size in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def _array(body: str) -> tuple[list[ParsedCall] | None, int]:
    """The calls of the JSON array at the start of ``body`` and where it ends; (None, 0) if it is not complete
    yet or not an array of calls, (None, -1) once it certainly is not one."""
    stripped = body.lstrip()
    if not stripped:
        return None, 0
    if not stripped.startswith("["):
        return None, -1
    try:
        value, end = json.JSONDecoder().raw_decode(body, len(body) - len(stripped))
    except ValueError:
        return None, 0  # unfinished, or broken: decided when the reply ends
    calls = [call_of(item, "arguments", "parameters") for item in value] if isinstance(value, list) else []
    if not calls or any(call is None for call in calls):
        return None, -1
    return [call for call in calls if call is not None], end


def _named_args(body: str) -> tuple[list[ParsedCall] | None, int]:
    """The v11 call at the start of ``body`` (``name[ARGS]{...}``, after the marker), as ``_array`` answers."""
    at = body.find(ARGS)
    if at < 0:  # the name (and an id) still coming, unless what came cannot be one
        return (None, -1) if len(body) > 128 or "\n" in body or START in body else (None, 0)
    name = body[:at].split(CALL_ID, 1)[0]
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        return None, -1
    rest = body[at + len(ARGS) :]
    stripped = rest.lstrip()
    if not stripped:
        return None, 0
    if not stripped.startswith("{"):
        return None, -1
    try:
        value, end = json.JSONDecoder().raw_decode(body, len(body) - len(stripped))
    except ValueError:
        return None, 0
    call = call_of({"name": name, "arguments": value}, "arguments")
    return ([call], end) if call else (None, -1)


class MistralParser(ToolCallParser):
    """Text streams; from ``[TOOL_CALLS]`` the reply is held until its JSON array closes, then parsed."""

    NAME = "mistral"
    SPECIAL_TOKENS = (START,)
    #: Whether a reply opening with a bare JSON array is read as calls (the v3 array outlives a dropped marker).
    BARE_ARRAY = True

    #: Incremental reading (``CallSequence``): the array's first opening, from one call's arguments to the
    #: next's, and from the last call's arguments to the end of the array.
    FIRST = re.compile(r"\s*\[\s*" + JSON_OPENING)
    FOLLOWING: re.Pattern[str] | None = re.compile(r"\s*\}\s*,\s*" + JSON_OPENING)
    END = re.compile(r"\s*\}\s*\]")

    @staticmethod
    def _read(body: str) -> tuple[list[ParsedCall] | None, int]:
        return _array(body)

    def __init__(self) -> None:
        self._buffer = ""  # text not yet said: a possible marker, or the open call array after it
        self._in_call = False
        self._gap = ""  # the whitespace before the open marker: text again if no calls follow it
        self._marker = START  # what opened the call: the marker, or nothing (a bare array opening the reply)
        self._said = False  # whether anything (text or a call) was said yet
        self._calls = 0
        self._sequence: CallSequence | None = None  # incremental: the open block's calls, read so far

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return START in chat_template and ARGS not in chat_template

    @classmethod
    def call_id(cls) -> str:
        """9 letters and digits: the only ids Mistral's templates (v3 and v11) accept in a history."""
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))

    @classmethod
    def call_format(
        cls, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: CallMode, parallel: bool
    ) -> dict[str, Any] | None:
        """``[TOOL_CALLS][`` + calls as ``{"name": "f", "arguments": {...}}`` joined by ``, `` + ``]``.

        "auto" (a strict tool): text is free until ``[TOOL_CALLS]``, after which the array must match.
        """
        tags = [schema_tag(f'{{"name": {json.dumps(name)}, "arguments": ', schema, "}") for name, schema in functions]
        if mode == "named":
            return {
                "type": "structural_tag",
                "format": {**tags[0], "begin": START + "[" + tags[0]["begin"], "end": "}]"},
            }
        calls: dict[str, Any] = {"type": "tags_with_separator", "tags": tags, "separator": ", ", "at_least_one": True}
        calls["stop_after_first"] = not parallel
        array = {"type": "tag", "begin": START + "[", "content": calls, "end": "]"}
        if mode == "required":
            return {"type": "structural_tag", "format": array}
        return {
            "type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": [START], "tags": [array], "stop_after_first": True},
        }

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._in_call:
                if self.incremental and self._marker:  # a bare array is free text to a grammar: read it whole
                    sequence = self._sequence = self._sequence or CallSequence(self.FIRST, self.FOLLOWING, self.END)
                    events += sequence.read(self._buffer)
                    if sequence.announced:  # the block is calls from now on: read here until it closes
                        end = sequence.ended(self._buffer)
                        if end is None:
                            return events
                        self._calls, self._said = self._calls + sequence.calls, True
                        self._buffer, self._in_call, self._sequence = self._buffer[end:], False, None
                        continue
                calls, end = self._read(self._buffer)
                if calls is None:
                    if end < 0:  # certainly not calls: the marker and what follows are text again
                        if self._gap + self._marker:
                            events.append(TextPiece(self._gap + self._marker))
                        self._in_call, self._said, self._sequence = False, True, None
                        continue
                    return events
                events.extend(calls)
                self._calls, self._said = self._calls + len(calls), True
                self._buffer, self._in_call, self._sequence = self._buffer[end:], False, None
                continue
            start = self._buffer.find(START)
            if start >= 0:
                before = self._buffer[:start]
                if before.strip():
                    events.append(TextPiece(before.rstrip()))  # the blank before the calls is layout
                self._gap, self._marker = before[len(before.rstrip()) :], START
                self._buffer, self._in_call = self._buffer[start + len(START) :], True
                continue
            head = self._buffer.lstrip()
            if self.BARE_ARRAY and not self._said and head.startswith("[") and not START.startswith(head[: len(START)]):
                # engines that skip special tokens drop the [TOOL_CALLS] control token: a reply that opens
                # with a JSON array of objects is read as the calls the marker would have introduced
                inside = head[1:].lstrip()
                if not inside:
                    return events  # "[" alone: an array or text, not known yet
                if inside.startswith("{"):
                    self._gap, self._marker = self._buffer[: len(self._buffer) - len(head)], ""
                    self._buffer, self._in_call = head, True
                    continue
            # no marker in the buffer: say all but a possible marker and trailing whitespace
            cut = _partial_start(self._buffer)
            sure = self._buffer[:cut]
            held = sure[len(sure.rstrip()) :]
            sure = sure[: len(sure) - len(held)]
            if sure:
                events.append(TextPiece(sure))
                self._said = True
            self._buffer = held + self._buffer[cut:]
            return events

    def finish(self) -> list[Event]:
        sequence, self._sequence = self._sequence, None
        if self._in_call and sequence is not None and sequence.announced:
            # cut inside a block of announced calls: they stay calls, and what follows them (but their own
            # closing) is the text it was
            events = sequence.finish()
            self._calls += sequence.calls
            rest, self._buffer, self._in_call = self._buffer[sequence.at :], "", False
            closing = _CALL_END.match(rest)
            rest = rest[closing.end() :] if closing else rest
            return [*events, TextPiece(rest)] if rest.strip() else events
        rest = (self._gap + self._marker if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        if not rest or (self._calls and not rest.strip()):
            return []
        return [TextPiece(rest)]


class MistralV11Parser(MistralParser):
    """The v11 form: each call is ``[TOOL_CALLS]name[ARGS]{...}``; held from the marker until its object closes."""

    NAME = "mistral_v11"
    SPECIAL_TOKENS = (START, ARGS, CALL_ID)
    BARE_ARRAY = False
    #: One call per block: its name (and an id, as a history writes one) up to ``[ARGS]``; the block ends
    #: with the arguments.
    FIRST = re.compile(r"(?P<name>[A-Za-z0-9_.\-]{1,64})(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]\s*")
    FOLLOWING = None
    END = re.compile("")

    @staticmethod
    def _read(body: str) -> tuple[list[ParsedCall] | None, int]:
        return _named_args(body)

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return START in chat_template and ARGS in chat_template

    @classmethod
    def call_format(
        cls, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: CallMode, parallel: bool
    ) -> dict[str, Any] | None:
        """One ``[TOOL_CALLS]name[ARGS]`` + arguments block per call, back to back (the template's own layout).

        "auto" (a strict tool): text is free until ``[TOOL_CALLS]``, after which the call must match.
        """
        tags = [schema_tag(f"{START}{name}{ARGS}", schema, "") for name, schema in functions]
        return calls_format(tags, mode=mode, parallel=parallel, separator="", trigger=START)
