"""Per-sequence token sampling for the transformers engine.

Each sequence in a batch has its own parameters and its own seeded generator, so a request's
output at a fixed seed does not depend on which other requests share the batch. A sequence with a
structured-output constraint also carries its grammar matcher: its row's forbidden tokens are masked
before the pick (rows without one are not touched), and the pick advances the matcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omniserve.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass
class SamplerState:
    """What sampling remembers about one sequence: its generator, its grammar and the tokens it produced."""

    params: SamplingParams
    eos_ids: tuple[int, ...] = ()  # the ids that end the sequence, blocked until ``min_tokens``
    generator: torch.Generator | None = None
    output_counts: dict[int, int] = field(default_factory=dict)
    generated: int = 0
    grammar: Any = None  # an ``xgrammar.GrammarMatcher`` when the output is constrained
    grammar_rejected: bool = False  # the matcher refused a pick (cannot happen with its mask; ends the sequence)

    @classmethod
    def create(
        cls, params: SamplingParams, choice_index: int, eos_ids: tuple[int, ...] = (), grammar: Any = None
    ) -> SamplerState:
        """``grammar``: the request's compiled grammar (``structured.grammar``); each choice gets its own matcher."""
        import torch

        generator = None
        if not params.greedy:
            generator = torch.Generator()
            if params.seed is not None:
                generator.manual_seed(params.seed + choice_index)
            else:
                generator.seed()
        matcher = None
        if grammar is not None:
            from omniserve.structured.grammar import new_matcher

            matcher = new_matcher(grammar, eos_ids)
        return cls(params=params, eos_ids=eos_ids, generator=generator, grammar=matcher)

    def record(self, token_id: int) -> None:
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.generated += 1
        if self.grammar is not None and not self.grammar.accept_token(token_id):
            self.grammar_rejected = True

    @property
    def grammar_ended(self) -> bool:
        """The constraint is over: its grammar terminated (an end token or its last character), or it failed."""
        return self.grammar is not None and (self.grammar_rejected or self.grammar.is_terminated())


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def _apply_penalties(row: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Adjust one row in place (vLLM's semantics: only generated tokens are penalised)."""
    import torch

    p = state.params
    if state.output_counts and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
        ids = torch.tensor(list(state.output_counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(state.output_counts.values()), dtype=row.dtype)
        if p.repetition_penalty != 1.0:
            vals = row[ids]
            row[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    if state.generated < p.min_tokens and state.eos_ids and state.grammar is None:
        row[list(state.eos_ids)] = float("-inf")  # a grammar decides itself when the output may end
    return row


def _filter_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    import torch

    if 0 < top_k < row.shape[-1]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        remove = cumulative - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        row = torch.empty_like(row).scatter_(0, order, sorted_logits)
    return row


def sample_rows(logits: torch.Tensor, states: list[SamplerState]) -> list[Sampled]:
    """Pick one token per row of ``logits`` ([B, V], float32) following each row's parameters.

    Work is batched across rows; only what differs per row (penalties, top-k, the seeded random
    draw) loops. Sampling is inverse-CDF on one uniform draw from the row's own generator, which
    keeps a seeded request reproducible whatever else shares its batch.
    """
    import torch

    rows = logits.float()
    constrained = [i for i, s in enumerate(states) if s.grammar is not None]
    if constrained or any(_needs_penalties(s) for s in states):
        rows = rows.clone()  # never write into the caller's logits (prefill hands an expanded view)
        for i, state in enumerate(states):
            if _needs_penalties(state):
                _apply_penalties(rows[i], state)
    if constrained:
        from omniserve.structured.grammar import mask_rows

        mask_rows(rows, [states[i].grammar for i in constrained], constrained)
    tokens = torch.argmax(rows, dim=-1)
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    if sampled:
        tokens[sampled] = _draw(rows[sampled], [states[i] for i in sampled])
    picks = tokens.tolist()
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if any(s.params.logprobs for s in states) else None
    results: list[Sampled] = []
    for i, (state, token) in enumerate(zip(states, picks, strict=True)):
        state.record(token)
        if raw_logprobs is None or not state.params.logprobs:
            results.append(Sampled(token))
            continue
        lp = raw_logprobs[i]
        top: tuple[tuple[int, float], ...] = ()
        if state.params.top_logprobs:
            values, indices = torch.topk(lp, state.params.top_logprobs)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        results.append(Sampled(token, float(lp[token]), top))
    return results


def _needs_penalties(state: SamplerState) -> bool:
    p = state.params
    penalised = bool(state.output_counts) and (
        p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1.0
    )
    return penalised or (state.generated < p.min_tokens and bool(state.eos_ids) and state.grammar is None)


def _draw(rows: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    import torch

    temperatures = torch.tensor([s.params.temperature for s in states], dtype=rows.dtype)[:, None]
    scaled = rows / temperatures
    filtered = torch.stack(
        [
            _filter_top_k_top_p(scaled[i], s.params.top_k, s.params.top_p)
            if s.params.top_k > 0 or s.params.top_p < 1.0
            else scaled[i]
            for i, s in enumerate(states)
        ]
    )
    cdf = torch.cumsum(torch.softmax(filtered, dim=-1), dim=-1)
    draws = torch.cat([torch.rand(1, generator=s.generator) for s in states])[:, None] * cdf[:, -1:]
    picks = torch.searchsorted(cdf, draws).squeeze(-1)
    return picks.clamp_(max=rows.shape[-1] - 1)
