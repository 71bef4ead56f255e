"""Engine-neutral sampling parameters: what every engine adapter maps to its own options.

Protocol models convert into this (``to_sampling_params``); engines never see OpenAI field names.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniserve.structured.spec import StructuredOutput


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # end a choice (finish reason "stop") even with ignore_eos
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are blocked until this many tokens
    structured: StructuredOutput | None = None  # constrained decoding: what the output must match
    # special tokens kept in the text (all others are skipped): the markers of the tool-call format, when tools
    # are on and that format's markers are control tokens (Mistral's [TOOL_CALLS], [ARGS])
    keep_special: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
