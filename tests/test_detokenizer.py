"""The incremental detokenizer on a real tokenizer: the old full-decode text, at a constant cost per token.

The old detokenizer decoded the whole output again at every token (and searched it for stops), on
the transformers engine's one worker thread: a 2,000-token answer cost ~2 million decoded token ids.
These tests count the ids handed to ``tokenizer.decode`` (not time, so CI noise cannot matter) and
compare the text with that old algorithm on a varied sample.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from omniserve.engines.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"
TEXTS = (
    "héllo wörld, 中文字符 and 😀 emoji 👍🏽 done",
    "the quick brown fox jumps over the lazy dog " * 4,
    "ünïcödé ßtring — with “quotes” … and ½ ¾ ∑ ∞",
    "def add(a, b):\n    return a + b\n",
    "aaab abab ababab aaaa abcabd",
)


class CountingTokenizer:
    """The real tokenizer, counting ``decode`` calls and the token ids they were given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.ids = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.calls += 1
        self.ids += len(ids)
        return self.inner.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2: Path) -> Any:
    """A byte-level BPE tokenizer: multi-byte characters are split over several tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2))


def decode_again_each_token(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[str, bool, int]:
    """The old algorithm: (text, stopped, tokens taken), the whole output decoded again at every token."""
    for taken in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:taken], skip_special_tokens=True)
        hits = [i for i in (full.find(s) for s in stops) if i >= 0]
        if hits:
            return full[: min(hits)], True, taken
    return tokenizer.decode(ids, skip_special_tokens=True), False, len(ids)


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop (what must be withheld)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def run(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[str, bool, int]:
    """The new detokenizer, checking at every token that it emits all it may and nothing it may not."""
    detok = IncrementalDetokenizer(tokenizer, tuple(stops))
    emitted = ""
    for taken, token in enumerate(ids, start=1):
        piece, stopped = detok.add(token)
        emitted += piece
        if stopped:
            return emitted, True, taken
        # what is decided is out: everything decoded but an incomplete last character or a possible stop's start
        decided = tokenizer.decode(ids[:taken], skip_special_tokens=True).rstrip(REPLACEMENT)
        assert emitted == decided[: len(decided) - held_back(decided, stops)], (ids[:taken], stops)
    return emitted + detok.flush(), False, len(ids)


def sample(tokenizer: Any, rng: random.Random) -> tuple[list[int], list[str]]:
    """Real text (multi-byte characters, special tokens mixed in) or random ids (invalid UTF-8), with
    stops cut from the text (so they span tokens and characters), overlapping or absent."""
    if rng.random() < 0.3:
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 50))]
    else:
        ids = list(tokenizer(rng.choice(TEXTS), add_special_tokens=False)["input_ids"])
        for _ in range(rng.randrange(0, 4)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(tokenizer.all_special_ids))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stops: list[str] = []
    for _ in range(rng.randrange(0, 5)):
        if text and rng.random() < 0.7:
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randrange(1, 12)])
        else:
            stops.append(rng.choice(["zz", "aab", "abab", "ab", "abc", "dog the", "字符 a"]))
    # The one deliberate difference: the old detokenizer could stop on the U+FFFD that stands for a
    # character still incomplete; the new one only matches text that is final.
    return ids, [s for s in stops if s and REPLACEMENT not in s]


def test_same_text_as_decoding_everything_again(tokenizer: Any) -> None:
    rng = random.Random(12)
    stopped = 0
    for _ in range(1000):
        ids, stops = sample(tokenizer, rng)
        expected = decode_again_each_token(tokenizer, ids, stops)
        assert run(tokenizer, ids, stops) == expected, (ids, stops)
        stopped += expected[1]
    assert stopped > 100  # the sample does exercise stop strings


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("in the end", ["he", " th"], "in"),  # one token ends both: the earliest start wins, not the first listed
        ("xabcdx", ["bc", "abcd"], "xa"),  # a stop found at an earlier token wins
        ("the lazy dog", ["lazy dog"], "the "),  # a stop spanning tokens
        ("aaab", ["aab"], "a"),  # a stop overlapping itself
        ("ababab", ["abab"], ""),
        ("héllo 中文字符 ok", ["文字"], "héllo 中"),  # multi-byte characters split over byte tokens
        ("héllo 中文字符 ok", ["字符 o", "zz"], "héllo 中文"),
    ],
)
def test_stop_strings(tokenizer: Any, text: str, stops: list[str], expected: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert run(tokenizer, ids, stops) == decode_again_each_token(tokenizer, ids, stops)
    assert run(tokenizer, ids, stops)[:2] == (expected, True)


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    special = tokenizer.all_special_ids[0]
    ids = tokenizer("héllo wörld", add_special_tokens=False)["input_ids"]
    mixed = [special, *ids[:2], special, special, *ids[2:], special]
    assert run(tokenizer, mixed, [])[0] == "héllo wörld"


def test_decoding_work_per_token_is_constant(tokenizer: Any) -> None:
    """2,000 tokens: the old detokenizer handed decode ~1,000 ids per token (2,003,000 in all, in
    2,001 calls); this one a handful per token, in about one call, the same at the end as at the start."""
    ids = list(tokenizer(" ".join(TEXTS) * 60, add_special_tokens=False)["input_ids"])[:2000]
    assert len(ids) == 2000
    counting = CountingTokenizer(tokenizer)
    # stops that keep matching partially (text is held back and re-examined) but never in full
    detok = IncrementalDetokenizer(counting, ("the quick brown fox jumps over the lazy cat", "ababac", "中文字符 z"))
    text, per_quarter = "", []
    for i, token in enumerate(ids):
        piece, stopped = detok.add(token)
        assert not stopped
        text += piece
        if (i + 1) % 500 == 0:
            per_quarter.append(counting.ids)
    text += detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.calls <= 1.25 * len(ids)
    assert counting.ids <= 10 * len(ids)
    quarters = [b - a for a, b in zip([0, *per_quarter], per_quarter, strict=False)]
    assert max(quarters) <= 1.5 * min(quarters)  # no growth with the length of the output


def test_bytes_that_never_complete_a_character_cost_no_more(tokenizer: Any) -> None:
    """A model emitting lone UTF-8 lead bytes: the text always ends in U+FFFD, which is taken as final
    after a few tokens instead of widening the decode window for ever."""
    lead = tokenizer("中", add_special_tokens=False)["input_ids"][0]
    assert tokenizer.decode([lead]) == REPLACEMENT
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, ("\ufffdx",))
    text = "".join(detok.add(lead)[0] for _ in range(2000)) + detok.flush()
    assert text == tokenizer.decode([lead] * 2000)
    assert counting.ids <= 40 * 2000
