"""A call's arguments read as the model writes them: the part every incremental tool-call parser shares.

Each format frames a call its own way (``<tool_call>{"name": "f", "arguments": ``, ``[TOOL_CALLS]f[ARGS]``,
``{"name": "f", "parameters": ``), but once the name is written what follows is the arguments object, left
to right. So a parser under an enforced call grammar (where a call, once begun, cannot turn back into text)
announces the call as soon as a pattern of its opening has matched and the object has begun (``CallStart``),
then hands on the object's text in the pieces it arrives in (``ArgumentsPiece``). The object ends where
its brackets balance outside strings; the pieces are slices of what the model wrote, never re-encoded, so
they join into exactly the ``arguments`` of the closing ``ParsedCall``, and none is ever taken back.
"""

from __future__ import annotations

import re

from omniserve.tools.base import ArgumentsPiece, CallStart, Event, ParsedCall

#: A JSON call object's opening up to its arguments, the name first (as every call grammar writes it); the
#: arguments key is "arguments" (Hermes, Mistral) or "parameters" (Llama 3), either accepted from any of them.
JSON_OPENING = r'\{\s*"name"\s*:\s*"(?P<name>[^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'


class OpenCall:
    """One call read incrementally from a growing text: announced once ``opening`` has matched at ``start`` and
    an object follows, its arguments given as they come, ended where the object closes.

    ``opening`` must capture the function's name as group ``name`` and end where the arguments begin (its
    trailing whitespace included, so the first character after a match that is not at the text's end is the
    arguments' own). What follows an opening that is not an object (arguments the model encoded as a string)
    is ``refused``: the call is then left to the parser's reading of the whole call.
    """

    def __init__(self, opening: re.Pattern[str], start: int = 0) -> None:
        self.name: str | None = None
        self.refused = False
        self.done = False
        self.end = start  # where reading continues; once done, just after the arguments object
        self._opening = opening
        self._arguments = ""
        self._depth, self._in_string, self._escaped = 0, False, False

    def read(self, text: str) -> list[Event]:
        """What ``text`` (all of it so far; it only grows) makes certain beyond what was given before."""
        events: list[Event] = []
        if self.name is None:
            if self.refused:
                return events
            opening = self._opening.match(text, self.end)
            if opening is None or opening.end() == len(text):  # the name, or the arguments' first character, to come
                return events
            if text[opening.end()] != "{":
                self.refused = True
                return events
            self.name, self.end = opening.group("name"), opening.end()
            events.append(CallStart(self.name))
        start = self.end
        while self.end < len(text) and not self.done:
            char = text[self.end]
            self.end += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                self.done = self._depth == 0
        if self.end > start:
            piece = text[start : self.end]
            self._arguments += piece
            events.append(ArgumentsPiece(piece))
        return events

    def close(self) -> ParsedCall:
        """The announced call, ended (or cut short: then its arguments are what was written of them)."""
        assert self.name is not None
        return ParsedCall(name=self.name, arguments=self._arguments, opened=True)


class CallSequence:
    """Calls written back to back in one block, read incrementally: Mistral's ``[{...}, {...}]`` array, Llama 3's
    ``{...}; {...}`` reply, Mistral v11's single ``name[ARGS]{...}``.

    ``first`` is the first call's opening, ``following`` the text from the end of one call's arguments to the
    next call's arguments (the call's closing, the separator, the next opening: None where a block holds one
    call), ``end`` the text from the end of the last call's arguments that closes the block (None: the block
    lasts to the end of the reply). The openings capture the name as group ``name``. ``start``: where in the
    text the block begins.
    """

    def __init__(
        self,
        first: re.Pattern[str],
        following: re.Pattern[str] | None,
        end: re.Pattern[str] | None = None,
        start: int = 0,
    ) -> None:
        self.calls = 0  # calls closed
        self.at = start  # where the text after the last closed call begins
        self._first, self._following, self._end = first, following, end
        self._open: OpenCall | None = None

    @property
    def announced(self) -> bool:
        """Whether a call was announced: from then on the block is read here, never as text again."""
        return self.calls > 0 or (self._open is not None and self._open.name is not None)

    def read(self, text: str) -> list[Event]:
        """The events ``text`` (all of the block so far) makes certain beyond those given before."""
        events: list[Event] = []
        while True:
            if self._open is None:
                if self.calls and self._following is None:
                    return events
                self._open = OpenCall(self._following if self.calls else self._first, self.at)
            events += self._open.read(text)
            if not self._open.done:
                return events
            events.append(self._open.close())
            self.calls, self.at, self._open = self.calls + 1, self._open.end, None

    def ended(self, text: str) -> int | None:
        """Where the block ends in ``text``, once its last call closed and its closing is written; else None."""
        if self._end is None or self.calls == 0 or (self._open is not None and self._open.name is not None):
            return None
        found = self._end.match(text, self.at)
        return None if found is None else found.end()

    def finish(self) -> list[Event]:
        """The reply ended inside the block: a call announced and cut short still closes, as a call."""
        open_call, self._open = self._open, None
        if open_call is None or open_call.name is None:
            return []
        self.calls, self.at = self.calls + 1, open_call.end
        return [open_call.close()]
