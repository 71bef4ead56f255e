"""Per-sequence token sampling for the transformers engine.

Each sequence in a batch has its own parameters and its own seeded generator, so a request's
output at a fixed seed does not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omniserve.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass
class SamplerState:
    """What sampling remembers about one sequence: its generator and the tokens it produced."""

    params: SamplingParams
    generator: torch.Generator | None = None
    output_counts: dict[int, int] = field(default_factory=dict)
    generated: int = 0

    @classmethod
    def create(cls, params: SamplingParams, choice_index: int) -> SamplerState:
        import torch

        generator = None
        if not params.greedy:
            generator = torch.Generator()
            if params.seed is not None:
                generator.manual_seed(params.seed + choice_index)
            else:
                generator.seed()
        return cls(params=params, generator=generator)

    def record(self, token_id: int) -> None:
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.generated += 1


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def _apply_penalties(row: torch.Tensor, state: SamplerState, eos_ids: tuple[int, ...]) -> torch.Tensor:
    import torch

    p = state.params
    if state.output_counts and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
        ids = torch.tensor(list(state.output_counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(state.output_counts.values()), dtype=row.dtype)
        if p.repetition_penalty != 1.0:
            vals = row[ids]
            row[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    if state.generated < p.min_tokens and eos_ids:
        row[list(eos_ids)] = float("-inf")
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


def sample_rows(logits: torch.Tensor, states: list[SamplerState], eos_ids: tuple[int, ...]) -> list[Sampled]:
    """Pick one token per row of ``logits`` ([B, V], float32) following each row's parameters."""
    import torch

    want_logprobs = any(s.params.logprobs for s in states)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    results: list[Sampled] = []
    for i, state in enumerate(states):
        p = state.params
        row = _apply_penalties(logits[i].clone(), state, () if p.ignore_eos else eos_ids)
        if p.greedy:
            token = int(torch.argmax(row))
        else:
            row = _filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=state.generator))
        state.record(token)
        if raw_logprobs is not None and p.logprobs:
            lp = raw_logprobs[i]
            top: tuple[tuple[int, float], ...] = ()
            if p.top_logprobs:
                values, indices = torch.topk(lp, p.top_logprobs)
                top = tuple((int(t), float(v)) for t, v in zip(indices, values, strict=True))
            results.append(Sampled(token, float(lp[token]), top))
        else:
            results.append(Sampled(token))
    return results
