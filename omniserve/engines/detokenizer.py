"""Incremental detokenization with stop strings, shared by engines that produce token ids.

Streaming must never emit text that a stop string later removes, nor half of a multi-byte
character; so text that could still become a stop string, or ends in an incomplete UTF-8
sequence, is held back until it is decided.

This runs for every generated token on an engine's worker (the transformers engine has one thread
for all its sequences), so a token costs a bounded amount of work however long the output grows:

- Only a window of recent tokens is decoded, as vLLM's incremental detokenizer does with
  ``prefix_offset``/``read_offset``: the text of ``ids[prefix:read]`` is known, ``ids[prefix:]``
  is decoded and what lies beyond the known text is new. Decoding from ``prefix`` rather than from
  ``read`` gives the tokenizer the context it needs to place spaces at a token boundary. The window
  restarts at the last settled token once it spans ``_WINDOW`` tokens: about one ``decode`` of a
  few tokens per token, where decoding the whole output again made a generation quadratic.
- Stop strings are matched by one Knuth-Morris-Pratt automaton per stop, fed only the new
  characters. Its state is both "a stop ends here" and "this much of the text's end could still
  begin a stop" (the text held back), so no text is searched twice and a token costs work in
  proportion to its characters, whatever the stops' lengths.
- Special tokens are dropped from the text (``skip_special_tokens``), except those a request asks to keep
  (``SamplingParams.keep_special``): a tool-call format whose markers are control tokens (Mistral's
  ``[TOOL_CALLS]``, ``[ARGS]``) needs them in the text to find the calls, and only them; an end-of-turn
  or any other control token still never reaches the content.
"""

from __future__ import annotations

import functools
from typing import Any

_REPLACEMENT = "\ufffd"
#: Tokens one decode window may span before it restarts at the last settled token.
_WINDOW = 8
#: Tokens after the last settled one before a trailing U+FFFD is taken as final. No character
#: needs more than 4 byte tokens; special tokens (decoded to nothing) may sit between them.
_MAX_UNSETTLED = 16


@functools.lru_cache(maxsize=16)
def dropped_special_tokens(tokenizer: Any, keep: tuple[str, ...]) -> dict[int, str]:
    """The special tokens ``skip_special_tokens`` would drop, by id, less those named in ``keep``.

    Cached per tokenizer and keep-set: a request with tools asks for it once, not once per token.
    """
    special = {i: added.content for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special}
    for token_id in tokenizer.all_special_ids:
        special.setdefault(token_id, tokenizer.convert_ids_to_tokens(token_id))
    return {i: token for i, token in special.items() if token not in keep}


def without_special_tokens(text: str, token_ids: list[int], dropped: dict[int, str]) -> str:
    """``text`` decoded with every special token kept, less those of ``token_ids`` in ``dropped``.

    For engines whose detokenizer keeps all special tokens or none (vLLM's ``skip_special_tokens``): a
    request that needs a few keeps all, and this takes the others back out of each delta.
    """
    for token_id in token_ids:
        token = dropped.get(token_id)
        if token:
            text = text.replace(token, "", 1)
    return text


class _StopAutomaton:
    """Knuth-Morris-Pratt matching of one stop string over text that only ever grows at its end.

    ``state`` is the length of the longest suffix of the text fed so far that is a proper prefix
    of the stop: exactly what must be held back for this stop.
    """

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        self._fail = [0] * len(stop)  # fail[i]: longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, text: str) -> int | None:
        """Advance over ``text``; return the index in ``text`` where the first match ends (exclusive), if any."""
        stop, fail, k = self.stop, self._fail, self.state
        for i, char in enumerate(text):
            while k and stop[k] != char:
                k = fail[k - 1]
            if stop[k] == char:
                k += 1
                if k == len(stop):
                    self.state = fail[k - 1]
                    return i + 1
        self.state = k
        return None


class IncrementalDetokenizer:
    """One sequence's token ids in, its text out, with stop strings applied and held-back text withheld."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), keep_special: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        # None: the tokenizer's own ``skip_special_tokens``; else the ids dropped before decoding all the rest
        self._drop = frozenset(dropped_special_tokens(tokenizer, keep_special)) if keep_special else None
        self._stops = [_StopAutomaton(s) for s in stop]
        self._ids: list[int] = []
        self._prefix = 0  # the decode window starts here: a token after which the text was complete
        self._read = 0  # tokens whose text is settled (no trailing incomplete character)
        self._prefix_chars = 0  # len(decode(ids[prefix:read]))
        self._partial = 0  # characters beyond ``_prefix_chars`` already taken from an unsettled window
        self._unsent = ""  # decoded text not emitted yet: it may still begin a stop string

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text to emit now, whether a stop string was reached)."""
        self._ids.append(token_id)
        new = self._new_text(final=False)
        if not new:
            return "", False
        return self._scan(new)

    def flush(self) -> str:
        """At the end of a sequence with no stop string: emit whatever was held back."""
        text = self._unsent + self._new_text(final=True)
        self._unsent = ""
        return text

    def _decode(self, ids: list[int]) -> str:
        if self._drop is None:
            return self._tokenizer.decode(ids, skip_special_tokens=True)
        kept = [i for i in ids if i not in self._drop]
        return self._tokenizer.decode(kept, skip_special_tokens=False, spaces_between_special_tokens=False)

    def _new_text(self, *, final: bool) -> str:
        """The characters decoded since the last call; an incomplete trailing character is left for later."""
        ids = self._ids
        if len(ids) == self._read:
            return ""
        text = self._decode(ids[self._prefix :])
        taken = self._prefix_chars + self._partial
        if text.endswith(_REPLACEMENT) and not final and len(ids) - self._read < _MAX_UNSETTLED:
            # what precedes the incomplete character is final already: stop strings may end there
            new = text.rstrip(_REPLACEMENT)[taken:]
            self._partial += len(new)
            return new
        new = text[taken:]
        self._partial = 0
        if len(ids) - self._prefix > _WINDOW:
            self._prefix, self._read = self._read, len(ids)
            self._prefix_chars = len(self._decode(ids[self._prefix : self._read]))
        else:
            self._read, self._prefix_chars = len(ids), len(text)
        return new

    def _scan(self, new: str) -> tuple[str, bool]:
        """Feed ``new`` to the stop automata; emit what can no longer be part of a stop string."""
        pending = self._unsent + new
        if not self._stops:
            self._unsent = ""
            return pending, False
        offset = len(self._unsent)  # where ``new`` starts in ``pending``
        hit: int | None = None
        for automaton in self._stops:
            end = automaton.feed(new)
            if end is not None:  # the earliest start wins, as a search of the whole text would find
                start = offset + end - len(automaton.stop)
                hit = start if hit is None else min(hit, start)
        if hit is not None:
            self._unsent = ""
            return pending[:hit], True
        held = max(a.state for a in self._stops)
        cut = len(pending) - held
        self._unsent = pending[cut:]
        return pending[:cut], False
