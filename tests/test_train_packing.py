"""Packing: several samples per row give each sample exactly the loss it has alone (attention, mRoPE, labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniserve.templates.training import IGNORE_INDEX
from omniserve.train.collate import PackingCollator, PaddingCollator, PositionPlanner, plan_packs
from omniserve.train.data import read_conversations
from omniserve.train.features import Sample, encode_all, limits_for
from tests.test_train_support import MIXED_CONVERSATIONS, write_jsonl, write_mixed_dataset


def _encode(model: Path, data: Path) -> list[Sample]:
    from omniserve.templates.render import PromptRenderer

    return encode_all(PromptRenderer.from_pretrained(model), read_conversations(data), limits_for(data)).samples


def _generating_module(model: Path) -> Any:
    from omniserve.engines.hf_model import load_model

    return load_model(model).lm


def _per_sample_losses(module: Any, batch: dict[str, Any], rows: list[list[int]]) -> list[float]:
    """Mean next-token loss of each sample, located by its token lengths within each row."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = module(**inputs).logits.float()
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    losses = []
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            mask = targets[row, start : start + length] != IGNORE_INDEX
            losses.append(float(token_loss[row, start : start + length][mask].sum() / mask.sum()))
            start += length
    return losses


def _alone(module: Any, sample: Sample) -> float:
    """The sample by itself, as the padding collator feeds it, with its first label ignored as in a pack."""
    batch = PaddingCollator(pad_token_id=0)([sample])
    batch["labels"][0, 0] = IGNORE_INDEX
    return _per_sample_losses(module, batch, [[len(sample)]])[0]


def test_packed_multimodal_rows_give_each_sample_its_unpacked_loss(tiny_omni: Path, tmp_path: Path) -> None:
    samples = _encode(tiny_omni, write_mixed_dataset(tmp_path))
    module = _generating_module(tiny_omni)
    packs = [samples[:5], samples[5:]]  # two rows of different lengths: the shorter one is padded
    collator = PackingCollator(pad_token_id=0, planner=PositionPlanner.for_model(module))

    batch = collator(packs)
    packed = _per_sample_losses(module, batch, [[len(s) for s in pack] for pack in packs])

    assert batch["position_ids"].shape[0] == 4  # text positions + (t, h, w) multimodal positions
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch
    alone = [_alone(module, s) for s in samples]
    assert packed == pytest.approx(alone, abs=2e-5)


def test_a_leaking_mask_would_be_seen(tiny_omni: Path, tmp_path: Path) -> None:
    """Control: with continuous positions (no reset) the same rows attend across samples and the losses move."""
    samples = _encode(tiny_omni, write_mixed_dataset(tmp_path))[:4]
    module = _generating_module(tiny_omni)
    batch = PackingCollator(pad_token_id=0, planner=PositionPlanner.for_model(module))([samples])
    width = batch["position_ids"].shape[-1]
    import torch

    batch["position_ids"][0, 0] = torch.arange(width)  # one sequence as far as the mask is concerned

    leaky = _per_sample_losses(module, batch, [[len(s) for s in samples]])
    alone = [_alone(module, s) for s in samples]
    assert leaky[0] == pytest.approx(alone[0], abs=2e-5)  # the first sample has nothing before it
    assert max(abs(a - b) for a, b in zip(leaky[1:], alone[1:], strict=True)) > 1e-3


def test_packed_text_rows_use_plain_positions_and_match(tiny_qwen2: Path, tmp_path: Path) -> None:
    conversations = [MIXED_CONVERSATIONS["text"], MIXED_CONVERSATIONS["text+system+multi-turn"]] * 2
    samples = _encode(tiny_qwen2, write_jsonl(tmp_path / "t.jsonl", conversations))
    module = _generating_module(tiny_qwen2)
    collator = PackingCollator(pad_token_id=0, planner=PositionPlanner.for_model(module))

    batch = collator([samples])
    packed = _per_sample_losses(module, batch, [[len(s) for s in samples]])

    assert batch["position_ids"].dim() == 2
    assert packed == pytest.approx([_alone(module, s) for s in samples], abs=2e-5)


def test_every_sample_start_is_unlabelled_in_a_pack(tiny_qwen2: Path, tmp_path: Path) -> None:
    samples = _encode(tiny_qwen2, write_jsonl(tmp_path / "t.jsonl", [MIXED_CONVERSATIONS["text"]] * 3))
    batch = PackingCollator(pad_token_id=0, planner=PositionPlanner(None))([samples])

    starts = [sum(len(s) for s in samples[:i]) for i in range(len(samples))]
    assert all(int(batch["labels"][0, start]) == IGNORE_INDEX for start in starts)
    assert batch["position_ids"][0, starts].tolist() == [0, 0, 0]


def test_plan_packs_fills_rows_without_overflow_and_keeps_every_sample_once() -> None:
    lengths = [50, 10, 40, 30, 60, 20, 90, 5]

    packs = plan_packs(lengths, max_length=100)

    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 100 for pack in packs)
    assert len(packs) == 4  # 305 tokens cannot fit in 3 rows of 100
    assert plan_packs(lengths, max_length=100) == packs
    with pytest.raises(ValueError, match="more than the pack size"):
        plan_packs([101], max_length=100)
