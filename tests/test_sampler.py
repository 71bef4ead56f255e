"""Sampling semantics of the transformers engine, on fixed logits."""

from __future__ import annotations

import torch

from omniserve.engines.sampler import SamplerState, sample_rows
from omniserve.sampling import SamplingParams


def state(**kw: object) -> SamplerState:
    params = SamplingParams(max_tokens=10, **kw)  # type: ignore[arg-type]
    return SamplerState.create(params, 0, eos_ids=(0,))


LOGITS = torch.log_softmax(torch.tensor([[0.1, 2.0, 1.5, 0.3, -1.0]] * 3), dim=-1)


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax() -> None:
    picks = sample_rows(LOGITS, [state(temperature=0.0), state(top_k=1, seed=3), state(top_p=0.01, seed=4)])
    assert [p.token_id for p in picks] == [1, 1, 1]


def test_seeded_draw_does_not_depend_on_batch_neighbours() -> None:
    alone = sample_rows(LOGITS[:1], [state(temperature=1.5, seed=11)])[0].token_id
    crowd = sample_rows(LOGITS, [state(temperature=0.0), state(temperature=1.5, seed=11), state(seed=5)])
    assert crowd[1].token_id == alone


def test_sampling_follows_the_distribution() -> None:
    s = state(temperature=1.0, seed=0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[sample_rows(LOGITS[:1], [s])[0].token_id] += 1
    expected = LOGITS[0].exp()
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_min_tokens_blocks_eos_and_penalties_lower_repeats() -> None:
    eos_favoured = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0]])
    assert sample_rows(eos_favoured, [state(temperature=0.0, min_tokens=2)])[0].token_id == 1
    repeated = state(temperature=0.0, frequency_penalty=2.0)
    first = sample_rows(LOGITS[:1], [repeated])[0].token_id
    second = sample_rows(LOGITS[:1], [repeated])[0].token_id
    assert (first, second) == (1, 2)


def test_logprobs_are_the_model_distribution() -> None:
    pick = sample_rows(LOGITS[:1], [state(temperature=0.0, logprobs=True, top_logprobs=2)])[0]
    assert abs(pick.logprob - float(LOGITS[0, 1])) < 1e-6
    assert [t for t, _ in pick.top] == [1, 2]


def test_min_tokens_blocks_exactly_the_ids_that_would_end_the_sequence() -> None:
    """The engine passes EOS and ``stop_token_ids`` (EOS left out with ignore_eos); all are held off alike."""
    eos_favoured = torch.tensor([[5.0, 4.0, 1.0, 0.0, 0.0]])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, min_tokens=1)
    stop_ids_only = SamplerState.create(params, 0, eos_ids=(0, 1))
    assert sample_rows(eos_favoured, [stop_ids_only])[0].token_id == 2
    nothing_ends = SamplerState.create(params, 0, eos_ids=())
    assert sample_rows(eos_favoured, [nothing_ends])[0].token_id == 0


def test_a_grammar_masks_only_its_own_row(tiny_qwen2: object) -> None:
    """A constrained row picks what its grammar allows and ends with it; its neighbours sample as if alone."""
    from transformers import AutoTokenizer

    from omniserve.structured.grammar import GrammarCache
    from omniserve.structured.spec import StructuredOutput

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2))
    vocab = len(tokenizer)
    compiled = GrammarCache(tokenizer, vocab).compile(StructuredOutput.choice(["yes", "no"], "guided_choice"))
    eos = (tokenizer.eos_token_id,)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    free = [state(temperature=0.0), state(temperature=1.0, seed=9)]
    alone = [p.token_id for p in sample_rows(logits[[0, 2]].clone(), free)]
    constrained = SamplerState.create(SamplingParams(max_tokens=10, seed=1), 0, eos, compiled)
    rows = [state(temperature=0.0), constrained, state(temperature=1.0, seed=9)]
    before = logits.clone()
    text = ""
    for _ in range(5):
        picks = sample_rows(logits, rows)
        assert [picks[0].token_id, picks[2].token_id] == alone  # neighbours untouched by the mask
        assert torch.equal(logits, before)  # the caller's logits are never written
        if constrained.grammar_ended:
            break
        text += tokenizer.decode([picks[1].token_id])
        rows[0], rows[2] = state(temperature=0.0), state(temperature=1.0, seed=9)
    assert constrained.grammar_ended and not constrained.grammar_rejected
    assert text in ("yes", "no")
