"""The one checkpoint loader (``models.loading``) and the one validation-error formatter (``validation``).

Checkpoints are the tiny ones built offline by ``omniserve.models``; the compressed-tensors one is
made here with llm-compressor's data-free FP8 scheme (a few seconds on two cores).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from omniserve.errors import ModelLoadError

# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def incomplete_qwen2(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_qwen2 with one MLP weight deleted from its safetensors file."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path_factory.mktemp("incomplete") / "qwen2"
    shutil.copytree(tiny_qwen2, broken)
    weights = load_file(broken / "model.safetensors")
    weights.pop("model.layers.0.mlp.up_proj.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


@pytest.fixture(scope="module")
def fp8_qwen2(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_qwen2 quantized with FP8_DYNAMIC (no calibration data) and saved as compressed-tensors."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("fp8") / "qwen2-fp8"
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_qwen2), dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    with warnings.catch_warnings():  # llm-compressor's offloaded saver warns about a 50 GB shard size
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(str(out), save_compressed=True)
    for item in tiny_qwen2.iterdir():  # tokenizer files, so the folder is a complete checkpoint
        if item.is_file() and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    return out


def test_complete_checkpoint_loads_with_its_class_and_an_empty_report(tiny_qwen2: Path) -> None:
    import torch

    from omniserve.models.loading import load_checkpoint

    checkpoint = load_checkpoint(tiny_qwen2, dtype="bf16")
    assert type(checkpoint.model).__name__ == checkpoint.config.architectures[0] == "Qwen2ForCausalLM"
    assert not checkpoint.report and checkpoint.report.lines() == []
    assert checkpoint.dtype is torch.bfloat16 and checkpoint.model.dtype is torch.bfloat16
    assert not checkpoint.model.training and not checkpoint.dequantized


def test_deleted_weight_is_reported_missing_and_the_engine_refuses_it(incomplete_qwen2: Path) -> None:
    from omniserve.engines.hf_model import load_model
    from omniserve.models.loading import load_checkpoint

    report = load_checkpoint(incomplete_qwen2).report
    assert report.missing == ["model.layers.0.mlp.up_proj.weight"]
    assert report.lines() == ["MISSING: model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"lacks weights the model needs \(model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(incomplete_qwen2)


def test_missing_weight_is_caught_even_when_transformers_is_told_to_be_quiet(incomplete_qwen2: Path) -> None:
    """The LOAD REPORT is a warning: verbosity ERROR must hide it from the console, not from the loader."""
    from transformers.utils import logging as hf_logging

    from omniserve.models.loading import load_checkpoint

    printed: list[str] = []

    class _Console(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            printed.append(record.getMessage())

    console = _Console()
    logger = logging.getLogger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    logger.addHandler(console)
    try:
        report = load_checkpoint(incomplete_qwen2).report
        assert hf_logging.get_verbosity() == logging.ERROR  # restored
    finally:
        logger.removeHandler(console)
        hf_logging.set_verbosity(verbosity)
    assert report.missing == ["model.layers.0.mlp.up_proj.weight"]
    assert not [m for m in printed if "LOAD REPORT" in m]


def test_compressed_tensors_checkpoint_is_dequantized_to_plain_weights(fp8_qwen2: Path, tiny_qwen2: Path) -> None:
    import torch
    from compressed_tensors.offload.cache import OffloadCache

    from omniserve.models.loading import load_checkpoint

    original = load_checkpoint(tiny_qwen2).model
    checkpoint = load_checkpoint(fp8_qwen2, dtype="float32")
    model = checkpoint.model
    assert checkpoint.dequantized and not checkpoint.report
    assert not any(isinstance(m._parameters, OffloadCache) for m in model.modules())  # remove_dispatch ran
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype is torch.float32
    similarity = torch.nn.functional.cosine_similarity(
        down.weight.flatten(), original.model.layers[0].mlp.down_proj.weight.flatten(), dim=0
    )
    assert similarity > 0.99
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():  # the inner module runs: no pre-hook on the top-level model is needed
        hidden = model.model(input_ids=ids).last_hidden_state
    assert torch.isfinite(hidden).all()


def test_dtype_names_resolve() -> None:
    import torch

    from omniserve.models.loading import resolve_dtype

    assert resolve_dtype("float32") is resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("bfloat16") is resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("auto", allow_auto=True) == "auto"
    with pytest.raises(ModelLoadError, match=r"unknown dtype 'auto'; choose one of \['bfloat16', 'float16', 'float32'"):
        resolve_dtype("auto")
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", allow_auto=True)


def test_auto_dtype_keeps_the_checkpoint_dtype_and_bad_folders_are_refused(tiny_qwen2: Path, tmp_path: Path) -> None:
    """``auto`` (quantize's choice) is the dtype config.json records; a named dtype overrides it."""
    import torch

    from omniserve.models.loading import load_checkpoint

    bf16 = tmp_path / "bf16"
    load_checkpoint(tiny_qwen2, dtype="bfloat16").model.save_pretrained(str(bf16))
    assert load_checkpoint(bf16, dtype="auto", allow_auto_dtype=True).model.dtype is torch.bfloat16
    assert load_checkpoint(bf16, dtype="float32").model.dtype is torch.float32
    tmp_path = tmp_path / "empty"
    tmp_path.mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_checkpoint(tmp_path)


def test_load_report_parser_reads_every_status_and_keeps_unknown_layouts() -> None:
    from omniserve.models.loading import parse_load_report

    table = (
        "\x1b[1mQwen2ForCausalLM LOAD REPORT\x1b[0m from: /m\n"
        "Key                | Status     |  | \n"
        "-------------------+------------+--+-\n"
        "extra.weight       | \x1b[38;5;208mUNEXPECTED\x1b[0m |  | \n"
        "model.norm.weight  | \x1b[31mMISSING\x1b[0m    | \n"
        "lm_head.weight     | MISMATCH   | Reinit due to size mismatch\n"
        "model.embed.weight | CONVERSION | \n"
    )
    report = parse_load_report(["an unrelated warning", table, "Odd LOAD REPORT without a table"])
    assert [str(r) for r in report.rows] == [
        "UNEXPECTED: extra.weight",
        "MISSING: model.norm.weight",
        "MISMATCH: lm_head.weight",
        "CONVERSION: model.embed.weight",
    ]
    assert report.missing == ["model.norm.weight"]
    assert report.unparsed == ["Odd LOAD REPORT without a table"] and report


# ----------------------------------------------------------------------------- validation formatter


def _errors(model: Any, value: Any) -> Any:
    from pydantic import TypeAdapter, ValidationError

    with pytest.raises(ValidationError) as info:
        TypeAdapter(model).validate_python(value)
    return info.value


def test_union_tags_and_member_types_are_dropped_from_locations() -> None:
    from omniserve.protocol import ChatCompletionRequest
    from omniserve.validation import describe_validation_error

    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": 5}}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    problem = describe_validation_error(_errors(ChatCompletionRequest, body))
    # pydantic's own location: messages.0.user.content.list[...].1.image_url.image_url.url
    assert problem.location == "messages[0].content[1].image_url.url"
    assert problem.message.startswith("messages[0].content[1].image_url.url: ") and problem.kind == "string_type"


def test_root_prefixes_the_location_and_missing_fields_say_so() -> None:
    from omniserve.protocol import ChatMessage
    from omniserve.validation import describe_validation_error

    problem = describe_validation_error(_errors(list[ChatMessage], [{"role": "user"}]), root="messages")
    assert (problem.location, problem.message, problem.kind) == (
        "messages[0].content",
        "messages[0].content: field required",
        "missing",
    )
    whole = describe_validation_error(_errors(list[ChatMessage], {"a": 1}), root="messages")
    assert whole.location == "messages" and whole.message.startswith("messages: ")


def test_deepest_error_wins_and_prefix_is_stripped_once() -> None:
    from omniserve.validation import describe_validation_error

    errors = [
        {"loc": ("body", "messages", 0), "msg": "shallow", "type": "union_tag_invalid"},
        {"loc": ("body", "messages", 0, "x"), "msg": "Value error, deep", "type": "value_error"},
        {"loc": ("body", "messages", 0, "y"), "msg": "as deep, later", "type": "value_error"},
    ]
    problem = describe_validation_error(errors)
    assert (problem.location, problem.message, problem.kind) == ("messages[0].x", "messages[0].x: deep", "value_error")
    named_body = describe_validation_error([{"loc": ("body", "body"), "msg": "extra", "type": "extra_forbidden"}])
    assert named_body.location == "body"  # FastAPI's prefix goes, a field really named "body" stays
    top = describe_validation_error([{"loc": (), "msg": "Value error, whole body", "type": "value_error"}])
    assert (top.location, top.message) == (None, "whole body")
    assert describe_validation_error([]).message == "invalid value"


def test_union_tags_come_from_the_wire_types() -> None:
    from omniserve.validation import openai_union_tags

    assert {"user", "assistant", "system", "developer", "text", "image_url", "input_audio"} <= openai_union_tags()
