"""The Hermes format, used by Qwen2.5 and Qwen3: ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``.

The templates of these families list the tools as JSON inside ``<tools>`` and tell the model to
answer each call as one JSON object between ``<tool_call>`` tags; several calls are several blocks.
A block whose body is not such an object (broken JSON, no name) is given back as the text it was:
the model wrote something, and a client sees it rather than an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from omniserve.tools.base import (
    CallMode,
    Event,
    ParsedCall,
    TextPiece,
    ToolCallParser,
    calls_format,
    schema_tag,
)
from omniserve.tools.streaming_args import JSON_OPENING, OpenCall

START = "<tool_call>"
END = "</tool_call>"
#: A call's opening up to its arguments, as the call grammar writes it: the name first, then "arguments".
_OPENING = re.compile(r"\s*" + JSON_OPENING)


def _partial_start(text: str) -> int:
    """Where a suffix of ``text`` that could still grow into ``<tool_call>`` begins (``len(text)``: none)."""
    for size in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-size:]):
            return len(text) - size
    return len(text)


def _call(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class HermesParser(ToolCallParser):
    """Text streams as it comes; a call is held from ``<tool_call>`` to ``</tool_call>`` and then parsed whole
    (``incremental``: announced by name and its arguments streamed as written, ``streaming_args.OpenCall``).

    Whitespace is held too until text follows it: the blank lines a model writes between and around
    its calls are not content, so a reply of calls only has ``content`` null, streamed or not.
    """

    NAME = "hermes"
    SPECIAL_TOKENS = (START, END)  # added tokens in Qwen's tokenizers; special in some Hermes fine-tunes

    def __init__(self) -> None:
        self._buffer = ""  # text not yet said: whitespace, a possible start tag, or an open call
        self._in_call = False
        self._gap = ""  # the whitespace before the open call: text again if the call turns out not to be one
        self._calls = 0
        self._open = OpenCall(_OPENING)  # incremental: the open call's name and arguments, read so far

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return START in chat_template and END in chat_template

    @classmethod
    def call_format(
        cls, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: CallMode, parallel: bool
    ) -> dict[str, Any] | None:
        """Each call as the Qwen templates write one (``tojson``: ``{"name": ..., "arguments": {...}}``).

        The name is part of a tag's fixed opening, the arguments its JSON-schema content; several calls
        are separated by a newline. "auto": text is free until ``<tool_call>``, after which the call must
        match (xgrammar's triggered tags).
        """
        tags = [
            schema_tag(f'{START}\n{{"name": {json.dumps(name)}, "arguments": ', schema, f"}}\n{END}")
            for name, schema in functions
        ]
        return calls_format(tags, mode=mode, parallel=parallel, separator="\n", trigger=START)

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._in_call:
                if self.incremental:
                    events.extend(self._open.read(self._buffer))
                end = self._buffer.find(END)
                if end < 0:
                    return events
                body = self._buffer[:end]
                call = self._open.close() if self._open.name is not None else _call(body)
                self._open = OpenCall(_OPENING)  # also after a block read whole: the next one starts afresh
                if call is None:
                    events.append(TextPiece(self._gap + START + body + END))
                else:
                    events.append(call)
                    self._calls += 1
                self._buffer = self._buffer[end + len(END) :]
                self._in_call = False
                continue
            start = self._buffer.find(START)
            if start >= 0:
                before = self._buffer[:start]
                if before.strip():
                    events.append(TextPiece(before.rstrip()))  # the blank line before a call is layout
                self._gap = before[len(before.rstrip()) :]
                self._buffer = self._buffer[start + len(START) :]
                self._in_call = True
                continue
            # no call begins in the buffer: say all but a possible start tag and trailing whitespace
            cut = _partial_start(self._buffer)
            sure = self._buffer[:cut]
            held = sure[len(sure.rstrip()) :]
            sure = sure[: len(sure) - len(held)]
            if sure:
                events.append(TextPiece(sure))
            self._buffer = held + self._buffer[cut:]
            return events

    def _close(self) -> ParsedCall:
        call, self._open = self._open.close(), OpenCall(_OPENING)
        return call

    def finish(self) -> list[Event]:
        if self._in_call and self._open.name is not None:  # cut inside an announced call: it stays a call
            self._buffer, self._in_call = "", False
            return [self._close()]
        rest = (self._gap + START if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        if not rest or (self._calls and not rest.strip()):
            return []
        return [TextPiece(rest)]
