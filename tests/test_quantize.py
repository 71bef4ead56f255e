"""Real llm-compressor runs (GPTQ, AWQ, FP8 dynamic, FP8 static) on the tiny omni and tiny text models.

Each checkpoint is made once per session (a few seconds each on two cores) and then checked from
the outside: its report, its config's ignore list, its tower tensors on disk against the
original's, a fresh transformers reload for a LOAD REPORT, and generation through the real server
with the official openai client.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_server
from tests.media_factory import png_bytes

METHODS = ("gptq", "awq", "fp8", "fp8-static")
SCHEMES = {"gptq": "W4A16", "awq": "W4A16_ASYM", "fp8": "FP8_DYNAMIC", "fp8-static": "FP8"}
CASES = [(kind, method) for kind in ("omni", "qwen2") for method in METHODS]


@pytest.fixture(scope="session")
def quantized(
    tiny_omni: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], Path]:
    """``quantized(kind, method)``: the output folder, quantized on first use and shared by every test."""
    from omniserve.quantize.options import QuantizeOptions
    from omniserve.quantize.run import quantize

    sources = {"omni": tiny_omni, "qwen2": tiny_qwen2}
    root = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, method: str) -> Path:
        if (kind, method) not in made:
            options = QuantizeOptions(
                model=sources[kind], method=method, output=root / f"{kind}-{method}", num_samples=6, progress=False
            )
            made[kind, method] = quantize(options).output
        return made[kind, method]

    return get


def _report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "quantization_report.json").read_text())


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_checkpoint_is_compressed_tensors_with_a_report(
    quantized: Callable[[str, str], Path], kind: str, method: str
) -> None:
    folder = quantized(kind, method)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    report = _report(folder)
    assert (report["method"], report["scheme"]) == (method, SCHEMES[method])
    assert report["size"]["after_bytes"] < report["size"]["before_bytes"]
    assert report["modules"]["quantized_count"] == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert all(".layers." in name for name in report["modules"]["quantized"])
    assert report["verification"]["kept_parameters_unchanged"] is True
    fidelity = report["fidelity"]
    assert fidelity["samples"] == 4 and fidelity["tokens"] > 100
    assert fidelity["logit_cosine"] > 0.95, fidelity  # random tiny weights: 0.98-0.999 measured
    assert 0 <= fidelity["kl_nats"] < 0.01, fidelity
    table = (folder / "quantization_report.md").read_text()
    assert f"{method} / {SCHEMES[method]}" in table and "fidelity vs original" in table
    assert not list(folder.parent.glob(f".{folder.name}.*")), "the staging folder was left behind"


@pytest.mark.parametrize("method", METHODS)
def test_omni_towers_and_head_are_kept_bit_for_bit(
    quantized: Callable[[str, str], Path], tiny_omni: Path, method: str
) -> None:
    import torch

    folder = quantized("omni", method)
    before, after = _tensors(tiny_omni), _tensors(folder)
    kept = [k for k in before if k.startswith(("thinker.visual.", "thinker.audio_tower.", "thinker.lm_head."))]
    assert len(kept) > 50
    assert [k for k in kept if k not in after or not torch.equal(before[k], after[k])] == []
    # and the decoder really is quantized on disk
    assert any(k.startswith("thinker.model.layers.0.") and "weight_scale" in k for k in after)
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    assert "thinker.lm_head" in ignore
    assert "thinker.visual.blocks.0.attn.q" in ignore and "thinker.audio_tower.layers.0.fc1" in ignore
    # vLLM strips "thinker." and fuses the tower's q/k/v into "visual.blocks.0.attn.qkv": the component
    # patterns must cover that name too, and no quantized layer
    patterns = [re.compile(p.removeprefix("re:")) for p in ignore if p.startswith("re:")]
    assert len(patterns) == 3
    for vllm_name in ("visual.blocks.0.attn.qkv", "audio_tower.layers.0.fc1", "lm_head"):
        assert any(p.match(vllm_name) for p in patterns), vllm_name
    quantized = _report(folder)["modules"]["quantized"]
    assert not [q for q in quantized for p in patterns if p.match(q) or p.match(q.removeprefix("thinker."))]


def test_omni_calibration_sent_media_through_the_towers(quantized: Callable[[str, str], Path]) -> None:
    calibration = _report(quantized("omni", "gptq"))["calibration"]
    assert calibration["pipeline"] == "sequential"
    assert {"image", "video", "audio"} <= set(calibration["by_modality"])
    assert _report(quantized("omni", "fp8"))["calibration"]["used"] == 0  # data-free


def test_text_model_skips_media_samples_and_says_so(quantized: Callable[[str, str], Path]) -> None:
    calibration = _report(quantized("qwen2", "gptq"))["calibration"]
    assert calibration["by_modality"] == {"text": 6}
    assert calibration["skipped"]["image"] > 0


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_transformers_reload_reports_no_missing_or_unexpected_weights(
    quantized: Callable[[str, str], Path], kind: str, method: str
) -> None:
    from omniserve.models.loading import load_checkpoint

    checkpoint = load_checkpoint(quantized(kind, method), dtype="auto", allow_auto_dtype=True)
    assert checkpoint.dequantized
    assert checkpoint.report.lines() == []


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_quantized_checkpoint_serves_through_the_real_server(
    quantized: Callable[[str, str], Path], kind: str, method: str
) -> None:
    server = start_server(quantized(kind, method), name="q", engine={"max_model_len": 1024})
    try:
        content: Any = "Tell me about the sky."
        if kind == "omni":
            image = f"data:image/png;base64,{base64.b64encode(png_bytes(64, 64)).decode()}"
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]
        out = server.client().chat.completions.create(
            model="q",
            messages=[{"role": "user", "content": content}],
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    finally:
        server.stop()
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6
    assert isinstance(out.choices[0].message.content, str)


def test_vision_language_ignore_list_names_both_memory_and_checkpoint_keys(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """Qwen2-VL's tower is ``model.visual`` in memory and ``visual`` on disk: both must be ignored."""
    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.options import QuantizeOptions
    from omniserve.quantize.run import quantize

    out = quantize(
        QuantizeOptions(model=tiny_qwen2_vl, method="gptq", output=tmp_path / "vl", num_samples=4, progress=False)
    ).output
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "visual.blocks.0.attn.qkv" in ignore  # what compressed-tensors writes (checkpoint names, for vLLM)
    assert "model.visual.blocks.0.attn.qkv" in ignore  # what transformers matches at reload
    checkpoint = load_checkpoint(out, dtype="auto", allow_auto_dtype=True)
    assert checkpoint.report.lines() == []
    model = checkpoint.model
    assert not hasattr(model.model.visual.blocks[0].attn.qkv, "quantization_scheme")
    assert hasattr(model.model.language_model.layers[0].mlp.down_proj, "quantization_scheme")


def test_quantize_towers_quantizes_them_and_keeps_the_head(tiny_omni: Path, tmp_path: Path) -> None:
    from omniserve.quantize.options import QuantizeOptions
    from omniserve.quantize.run import quantize

    report = quantize(
        QuantizeOptions(model=tiny_omni, method="fp8", output=tmp_path / "towers", quantize_towers=True, progress=False)
    ).report.as_dict()
    quantized = report["modules"]["quantized"]
    assert any(n.startswith("thinker.visual.") for n in quantized)
    assert any(n.startswith("thinker.audio_tower.") for n in quantized)
    assert report["modules"]["kept"] == ["thinker.lm_head"]


def test_decoder_capture_runs_every_tower(tiny_omni: Path) -> None:
    """The recorded decoder inputs come from full forwards: the image, video and audio towers all run."""
    from omniserve.config import MediaLimits
    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.calibration import encode, read_calibration
    from omniserve.quantize.capture import decoder_inputs
    from omniserve.quantize.default_set import default_calibration_file
    from omniserve.quantize.layout import find_layout
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(tiny_omni)
    samples = [s for s in read_calibration(default_calibration_file()) if s.modalities][:4]
    encoded = [encode(s, renderer, max_length=2048, limits=MediaLimits()) for s in samples]
    layout = find_layout(load_checkpoint(tiny_omni, dtype="auto", allow_auto_dtype=True).model)
    calls = {"visual": 0, "audio_tower": 0}
    hooks = [
        getattr(layout.lm, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        for name in calls
    ]
    try:
        recorded = decoder_inputs(layout, encoded, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["visual"] >= 2 and calls["audio_tower"] >= 1  # image + video samples, audio samples
    assert len(recorded) == len(encoded)
    for inputs, sample in zip(recorded, encoded, strict=True):
        assert inputs["inputs_embeds"].shape[1] == len(sample.token_ids)
        assert inputs["position_ids"].shape[0] == 3  # multimodal rotary positions, computed by the thinker
        assert "input_ids" not in inputs


def test_library_log_is_quiet_about_failures(quantized: Callable[[str, str], Path]) -> None:
    """No llm-compressor warning about untraceable models or failed Hessian inversions made it into a report."""
    for kind, method in CASES:
        warnings = _report(quantized(kind, method))["library_warnings"]
        assert not [w for w in warnings if "only traced" in w or "Hessian inversion failed" in w], warnings
    logging.getLogger(__name__).info("checked %d reports", len(CASES))
