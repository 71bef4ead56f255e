"""Incremental detokenization with stop strings, shared by engines that produce token ids.

Streaming must never emit text that a stop string later removes, nor half of a multi-byte
character; so text that could still become a stop string, or ends in an incomplete UTF-8
sequence, is held back until it is decided.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded text already emitted
        self.text = ""  # the full text emitted so far

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text to emit now, whether a stop string was reached)."""
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if self._stop:
            search_from = max(0, self._sent - self._max_stop)
            hits = [i for i in (full.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                return self._emit_upto(full, min(hits)), True
        if full.endswith(_REPLACEMENT):
            return "", False
        return self._emit_upto(full, len(full) - self._held_back(full)), False

    def flush(self) -> str:
        """At the end of a sequence with no stop string: emit whatever was held back."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        return self._emit_upto(full, len(full))

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of ``full`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _emit_upto(self, full: str, end: int) -> str:
        end = max(end, self._sent)
        delta = full[self._sent : end]
        self._sent = end
        self.text += delta
        return delta
