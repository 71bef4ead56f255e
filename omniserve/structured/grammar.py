"""Compile constraints for one tokenizer (a bounded cache) and apply them as token masks to a batch of logits.

Used by the transformers engine: ``GrammarCache.compile`` runs in the engine's ``prepare`` (so a grammar
the library refuses is a 400 before the stream starts, and a schema sent again is not compiled again),
``new_matcher`` gives each choice its own matcher, and ``mask_rows`` is called by the batched sampler for
the rows that have one. JSON is compiled compact (no free whitespace, as vLLM's
``disable_any_whitespace``): a model that is not trained for the format could otherwise spend its whole
token budget on spaces and end with JSON that does not parse.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any

from omniserve.errors import InvalidRequest
from omniserve.structured.check import grammar_error_text
from omniserve.structured.spec import StructuredOutput

if TYPE_CHECKING:
    import torch

#: Compiled grammars kept per tokenizer; a grammar is small, but schemas are client-chosen, so bounded.
DEFAULT_CACHE_SIZE = 256
#: JSON separators without spaces: what the model must write between items and after keys.
COMPACT = (",", ":")


class GrammarCache:
    """The grammar compiler of one served tokenizer, and its last ``size`` compiled grammars (LRU).

    xgrammar and the tokenizer's vocabulary table are loaded at the first compile, so a server whose
    requests never ask for a constraint never imports them.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, size: int = DEFAULT_CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._size = size
        self._compiler: Any = None
        self._compiled: collections.OrderedDict[StructuredOutput, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Any:
        """``spec`` as an ``xgrammar.CompiledGrammar``; a 400 naming ``spec.param`` if the library refuses it."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequest(
                f"the constraint cannot be enforced: {grammar_error_text(exc)}", param=spec.param
            ) from None
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def _compile(self, spec: StructuredOutput) -> Any:
        compiler = self._grammar_compiler()
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.value, any_whitespace=False, separators=COMPACT)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=COMPACT)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_grammar(spec.loaded()))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.value)
        return compiler.compile_structural_tag(spec.value)

    def _grammar_compiler(self) -> Any:
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices`` (each a JSON-escaped literal, which EBNF reads)."""
    import json

    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def new_matcher(compiled: Any, eos_ids: tuple[int, ...]) -> Any:
    """A matcher for one choice; the request's own end tokens are what may end the grammar.

    Without any (``ignore_eos`` and no ``stop_token_ids``) the grammar ends by itself when complete.
    """
    import xgrammar as xgr

    if eos_ids:
        return xgr.GrammarMatcher(compiled, override_stop_tokens=list(eos_ids))
    return xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)


def mask_rows(rows: torch.Tensor, matchers: list[Any], indices: list[int]) -> None:
    """Set to -inf, in place, every token each matcher forbids next, on rows ``indices`` of ``rows`` only.

    One bitmask for the batch; rows without a grammar are neither filled nor touched.
    """
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(rows.shape[0], rows.shape[-1])
    for matcher, row in zip(matchers, indices, strict=True):
        matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(rows, bitmask.to(rows.device, non_blocking=True), indices=indices)
