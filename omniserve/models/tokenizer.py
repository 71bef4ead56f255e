"""A small byte-level BPE tokenizer trained offline, in the layout Qwen's tokenizers use.

Model hubs are unreachable, so the tiny checkpoints cannot borrow a real vocabulary. Training on a
corpus generated here from a fixed word list keeps the result identical on every machine: the
``tokenizers`` BPE trainer is deterministic for a fixed input order (checked across processes, whose
hash seeds differ), and nothing below reads the clock, the environment or files.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Total size of every tiny vocabulary, special tokens included: a multiple of 64, as engines like.
TINY_VOCAB_SIZE = 4096

_WORD_TEXT = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by word
but what some we can out other were all there when up use your how said an each she which do their time if will
way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any new
work part take get place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found answer
school grow study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few north open
seem together next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea fish mountain
stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black short numeral
class wind question happen complete ship area half rock order fire south problem piece told knew pass since top
whole king space heard best hour better true during hundred five remember step early hold west ground interest
reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against pattern
slow center love person money serve appear road map rain rule govern pull cold notice voice unit power town fine
certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done
beauty drive stood contain front teach week final gave green quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane dry wonder laugh thousand
ago ran check game shape equal hot miss brought heat snow tire bring yes distant fill east paint language among
image video audio frame pixel speech camera screen photo describe caption scene model assistant user message
request response token server client stream prompt output input engine queue batch
"""
_WORDS = _WORD_TEXT.split()

_SUFFIXED = ("s", "ed", "ing", "er", "ly")
_PREFIXED = ("un", "re")

_SNIPPETS = (
    "Hello! How can I help you today?",
    "Sure, here is a short answer.",
    "I can see a picture of a red car near a tree.",
    "The video shows a person who walks along the river.",
    "The audio clip contains a voice and some music.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    "def add(a, b):\n    return a + b\n",
    "1. First item\n2. Second item\n3. Third item\n",
    "- one\n- two\n- three\n",
    "Q: What is 12 + 30?\nA: 42.",
)


def _word_forms(word: str) -> list[str]:
    """Naive inflections: enough to give the trainer realistic sub-word pieces (``ing``, ``ed``, ``re``)."""
    stem = word[:-1] if word.endswith("e") and len(word) > 2 else word
    forms = [word]
    forms += [(stem if suffix in ("ed", "ing", "er") else word) + suffix for suffix in _SUFFIXED]
    forms += [prefix + word for prefix in _PREFIXED]
    return forms


def tiny_corpus(*, sentences: int = 20_000) -> Iterator[str]:
    """Yield the training text, identical on every run (a fixed list and a fixed-seed generator)."""
    forms = [form for word in _WORDS for form in _word_forms(word)]
    for form in forms:
        yield from (form, form.capitalize(), " " + form, " " + form.capitalize())
    yield from _SNIPPETS
    rng = random.Random(0)
    for _ in range(sentences):
        words = " ".join(rng.choice(forms) for _ in range(rng.randint(4, 14)))
        end = rng.choice((".", "?", "!", ",", ":", ";"))
        yield f"{words.capitalize()}{end} {rng.randint(0, 10 ** rng.randint(1, 6))}"


def train_tiny_tokenizer(
    special_tokens: Sequence[str],
    *,
    named_tokens: Mapping[str, str] | None = None,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    vocab_size: int = TINY_VOCAB_SIZE,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerBase:
    """Train the BPE and wrap it as a ``Qwen2Tokenizer`` whose length is exactly ``vocab_size``.

    ``special_tokens`` take the last ids, in the order given (as in Qwen's vocabularies, where they
    follow the merges). ``named_tokens`` become tokenizer attributes that processors read, e.g.
    ``{"image_token": "<|IMAGE|>"}`` for ``tokenizer.image_token``.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError("special_tokens must be distinct")
    unknown = set((named_tokens or {}).values()) - set(special_tokens)
    if unknown:
        raise ValueError(f"named tokens missing from special_tokens: {sorted(unknown)}")
    vocab, merges = _train_bpe(vocab_size - len(special_tokens))
    if len(vocab) != vocab_size - len(special_tokens):
        raise RuntimeError(f"corpus too small: BPE stopped at {len(vocab)} entries")
    vocab.update({token: len(vocab) + i for i, token in enumerate(special_tokens)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=eos_token,
        pad_token=pad_token,
        model_max_length=model_max_length,
        **dict(named_tokens or {}),
    )
    # Every special token must be one atomic, skippable id, including those without an attribute name.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(token, special=True, normalized=False) for token in special_tokens]},
        replace_extra_special_tokens=True,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} entries, expected {vocab_size}")
    return tokenizer


def _train_bpe(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train with the normalizer and pre-tokenizer ``Qwen2Tokenizer`` rebuilds around the merges.

    Returns (vocab, merges) in training order.
    """
    import json

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any text (any script, emoji) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return dict(model["vocab"]), [tuple(pair) for pair in model["merges"]]
