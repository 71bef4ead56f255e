"""``--linear-kernel`` (omniserve/engines/fast_linear.py): oneDNN on prepacked weights, same answers as torch.

The oneDNN path is on by default for bfloat16 (``auto``), so what it must keep is the engine's output:
greedy tokens identical to plain torch in float32 (forced ``onednn``), bfloat16 logits within a stated
tolerance, LoRA adapters still applied per row, and an explicit ``onednn`` that cannot run refused at
load with a message (a ``ModelLoadError``: the server never starts half-configured). Named after
issue 15's ``--compile`` point: ``torch.compile`` lost to this in benchmarks/linear_kernels.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniserve.engines.fast_linear import LinearKernelError, choose_kernel
from omniserve.errors import ModelLoadError
from tests.test_lora import make_adapter

#: bfloat16 logits of the oneDNN path against torch's (measured: 0.0, the same kernel without the reorder)
BF16_LOGITS_ATOL = 1e-2


def _greedy(loaded: Any, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], Any]:
    """Prompts prefilled together, then ``steps`` batched greedy decode steps: each row's tokens, last logits."""
    from omniserve.engines.hf_model import decode_step, new_cache, prefill_chunk

    rows = len(prompts)
    cache = new_cache(loaded, rows, max(map(len, prompts)) + steps + 1)
    cache.add_rows(rows)
    logits = prefill_chunk(loaded, cache, prompts, [0] * rows, [None] * rows)
    tokens = [[int(t)] for t in logits.argmax(-1)]
    positions = [len(p) for p in prompts]
    for _ in range(steps):
        logits = decode_step(loaded, cache, [t[-1] for t in tokens], positions, [None] * rows)
        for row, token in zip(tokens, logits.argmax(-1), strict=True):
            row.append(int(token))
        positions = [p + 1 for p in positions]
    return tokens, logits


def _packed_count(loaded: Any) -> int:
    from omniserve.engines.fast_linear import packed_linear_class

    return sum(isinstance(m, packed_linear_class()) for m in loaded.model.modules())


PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [27, 18, 28], [9, 9, 9, 9, 9]]


def test_onednn_greedy_tokens_equal_torch_in_float32(tiny_qwen2: Path) -> None:
    import torch

    from omniserve.engines.hf_model import load_model

    plain = load_model(tiny_qwen2, dtype="float32", linear_kernel="torch")
    packed = load_model(tiny_qwen2, dtype="float32", linear_kernel="onednn")
    assert (plain.linear_kernel, _packed_count(plain)) == ("torch", 0)
    assert packed.linear_kernel == "onednn" and _packed_count(packed) > 0
    with torch.inference_mode():
        expected, expected_logits = _greedy(plain, PROMPTS, 12)
        tokens, logits = _greedy(packed, PROMPTS, 12)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_auto_packs_bfloat16_and_stays_close(tiny_qwen2: Path) -> None:
    import torch

    from omniserve.engines.hf_model import load_model

    if choose_kernel("auto", torch.bfloat16, torch.device("cpu")) != "onednn":
        pytest.skip("this CPU has no native bfloat16: auto keeps torch's kernel")
    plain = load_model(tiny_qwen2, dtype="bfloat16", linear_kernel="torch")
    packed = load_model(tiny_qwen2, dtype="bfloat16")  # auto
    assert packed.linear_kernel == "onednn" and _packed_count(packed) > 0
    with torch.inference_mode():
        _, expected = _greedy(plain, PROMPTS, 6)
        _, logits = _greedy(packed, PROMPTS, 6)
    assert (logits - expected).abs().max() <= BF16_LOGITS_ATOL


def test_choice_and_refusals(tiny_qwen2: Path) -> None:
    import torch

    from omniserve.engines.hf_model import load_model

    cpu = torch.device("cpu")
    assert choose_kernel("auto", torch.float32, cpu) == "torch"  # MKL is as fast at one row in float32
    assert choose_kernel("torch", torch.bfloat16, cpu) == "torch"
    assert choose_kernel("onednn", torch.float32, cpu) == "onednn"
    assert choose_kernel("auto", torch.float16, cpu) == "torch"
    assert choose_kernel("auto", torch.bfloat16, torch.device("cuda")) == "torch"
    with pytest.raises(LinearKernelError, match="needs the CPU device"):
        choose_kernel("onednn", torch.bfloat16, torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="dtype float16"):  # what the CLI reports at start
        load_model(tiny_qwen2, dtype="float16", linear_kernel="onednn")


def test_weight_written_in_place_is_repacked() -> None:
    import torch

    from omniserve.engines.fast_linear import apply_linear_kernel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4, bias=False))
    assert apply_linear_kernel(model, "onednn", torch.float32, torch.device("cpu")) == "onednn"
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.nn.functional.linear(model[0](x), model[1].weight))
        model[1].weight.mul_(2)  # in place, through the parameter
        expected = torch.nn.functional.linear(
            torch.nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight
        )
        torch.testing.assert_close(model(x), expected)


def test_lora_rows_unchanged_by_packing(tiny_qwen2: Path, tmp_path: Path) -> None:
    """PEFT wraps the packed layers like plain ones: per-row adapters give what they give on torch's kernel."""
    import torch

    from omniserve.engines.fast_linear import apply_linear_kernel
    from omniserve.lora.adapter import LoraBase, read_adapter
    from omniserve.lora.peft_batch import TransformersLora, per_row
    from omniserve.models.loading import load_checkpoint

    adapter_path = make_adapter(tiny_qwen2, tmp_path / "a", seed=11)
    described = LoraBase.from_checkpoint(tiny_qwen2, max_lora_rank=16)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]] * 2)
    outputs = []
    for kernel in ("torch", "onednn"):
        model = load_checkpoint(tiny_qwen2).model.eval()
        apply_linear_kernel(model, kernel, torch.float32, torch.device("cpu"))
        lora = TransformersLora(model)
        lora.load(read_adapter("a", adapter_path, 1, described))
        with torch.inference_mode(), per_row(model, ["a", None]):
            outputs.append(lora._module(input_ids=ids).logits.float())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
    assert (outputs[1][0] - outputs[1][1]).abs().max() > 1e-2  # the adapter row did change
