"""Can this machine run a scheme? Answered by trying it on a tiny model, not by a table of guesses.

What fails is rarely the quantization itself (llm-compressor quantizes every preset on a CPU): it
is running the result. Seen here with torch 2.13 / compressed-tensors 0.19: left compressed,
int4 and FP8 layers have no CPU matmul (``self and mat2 must have the same dtype ... Float8_e4m3fn``)
and must be dequantized at load, which works for every integer and FP8 preset; the FP4 presets
(NVFP4*, MXFP4*) dequantize to bfloat16 and then fail against float32 activations, so they cannot
be served in float32 here. A table would go stale with every library release; the probe cannot:
it quantizes a 2-layer model with the scheme, saves it, reloads it with the transformers engine's
loader (``models.loading``: dequantized at load) and runs a forward pass, in each dtype that will be
served, on the device that will run it. About 0.1-0.5 s per (scheme, device, dtype), remembered for the process.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

from omniserve.errors import ModelLoadError
from omniserve.quantize.errors import SchemeUnsupported


def check_scheme_runs(scheme: str, device: str, dtypes: tuple[str, ...]) -> None:
    """Raise ``SchemeUnsupported`` (naming the scheme, device, dtype and failing step) if it cannot run here."""
    for dtype in dict.fromkeys(dtypes):
        failure = _probe(scheme, device, dtype)
        if failure is not None:
            step, reason = failure
            raise SchemeUnsupported(
                f"scheme {scheme} cannot run on this machine ({device}, {dtype} weights): a tiny model quantized "
                f"with it fails at {step}: {reason}. Choose another --scheme (or serve in another dtype)"
            )


@functools.cache
def _probe(scheme: str, device: str, dtype: str) -> tuple[str, str] | None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.recipes import modifier_class

    torch_dtype = getattr(torch, dtype)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=128,  # a multiple of the 128-wide groups and blocks the presets use
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch_dtype).to(device)
        ids = torch.randint(0, 64, (1, 16), device=device)
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    step = "quantize"
    try:
        from llmcompressor import oneshot
        from torch.utils.data import DataLoader

        with tempfile.TemporaryDirectory(prefix="omniserve-probe-") as tmp:
            model.save_pretrained(tmp)  # oneshot reads config.json back from name_or_path
            model.config._name_or_path = tmp
            modifier = modifier_class("QuantizationModifier")(targets=["Linear"], scheme=scheme, ignore=["lm_head"])
            oneshot(model=model, recipe=modifier, dataset=DataLoader(batch, batch_size=None), pipeline="basic")
            step = "save"
            out = Path(tmp) / "quantized"
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
                model.save_pretrained(str(out), save_compressed=True)
            step = "reload"
            loaded = load_checkpoint(out, dtype=dtype, device=device).model
            step = "forward"
            with torch.inference_mode():
                logits = loaded(input_ids=ids).logits
            if not torch.isfinite(logits).all():
                return step, "the output holds NaN or inf"
    except Exception as exc:  # the probe's purpose is to turn any failure into a clear answer
        if isinstance(exc, ModelLoadError) and exc.__cause__ is not None:
            exc = exc.__cause__  # the library's own error, not the loader's "cannot load <temporary folder>"
        return step, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None
