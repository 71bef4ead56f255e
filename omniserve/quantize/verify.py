"""Reload a freshly written checkpoint and prove it is the model it claims to be.

Three checks, in order of how badly a failure hurts:

1. **Load report.** transformers logs a "LOAD REPORT" table (MISSING / UNEXPECTED / MISMATCH /
   CONVERSION weights) when checkpoint keys and model do not line up, then carries on with random or
   dropped weights; ``models.loading`` captures and parses it. Any row fails, and so does a report
   whose layout the parser does not know.
2. **Kept weights.** Every parameter promised to stay in full precision (towers, projectors,
   embeddings, ``lm_head``, final norm) is hashed before quantization and after reload; any
   difference fails.
3. **Fidelity.** Held-out calibration samples (never used for calibration) run through the
   original (logits computed before quantizing) and the reloaded model: mean per-token cosine of
   the logits, KL(original || quantized) in nats per token, and top-1 agreement. A figure, not a gate.

Checkpoints are reloaded by the loader the transformers engine serves them with
(``models.loading.load_checkpoint``): compressed-tensors layers dequantized at load (no int4/FP8
matmul on CPUs), in the checkpoint's own dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError
from omniserve.quantize.calibration import EncodedSample
from omniserve.quantize.errors import VerificationFailed


@dataclass
class Fidelity:
    samples: int
    tokens: int
    modalities: list[str]
    logit_cosine: float  # mean over tokens of cos(original logits, quantized logits)
    kl_nats: float  # mean over tokens of KL(original || quantized)
    top1_agreement: float  # share of tokens whose most likely next token is unchanged

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- kept weights


def digests(model: Any, names: Sequence[str]) -> dict[str, str]:
    """SHA-256 of each named parameter's bytes (device- and layout-independent)."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in names:
        tensor = params[name].detach().to("cpu").contiguous()
        out[name] = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- fidelity


def forward_logits(lm: Any, sample: EncodedSample, device: Any, dtype: Any) -> Any:
    """Next-token logits at every position of one sample, float32 on the CPU."""
    import torch

    inputs = sample.batch(device, dtype)
    if hasattr(lm, "rope_deltas"):
        lm.rope_deltas = None  # a stored offset from the previous sample would shift this one's positions
    with torch.inference_mode():
        out = lm(**inputs, use_cache=False)
    return out.logits[0].float().cpu()


def measure_fidelity(lm: Any, samples: Sequence[EncodedSample], references: Sequence[Any]) -> Fidelity | None:
    import torch.nn.functional as F

    if not samples:
        return None
    device, dtype = _device_dtype(lm)
    cos_sum = kl_sum = agree = 0.0
    tokens = 0
    for sample, ref in zip(samples, references, strict=True):
        got = forward_logits(lm, sample, device, dtype)
        cos_sum += F.cosine_similarity(ref, got, dim=-1).sum().item()
        ref_logp, got_logp = ref.log_softmax(-1), got.log_softmax(-1)
        kl_sum += (ref_logp.exp() * (ref_logp - got_logp)).sum(-1).sum().item()
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        tokens += ref.shape[0]
    result = Fidelity(
        samples=len(samples),
        tokens=tokens,
        modalities=sorted({m for s in samples for m in (s.modalities or {"text"})}),
        logit_cosine=round(cos_sum / tokens, 6),
        kl_nats=round(kl_sum / tokens, 6),
        top1_agreement=round(agree / tokens, 6),
    )
    if not (math.isfinite(result.logit_cosine) and math.isfinite(result.kl_nats)):
        raise VerificationFailed(f"the quantized model's logits are not finite on held-out samples: {result}")
    return result


def _device_dtype(module: Any) -> tuple[Any, Any]:
    param = next(module.parameters())
    return param.device, param.dtype


# ----------------------------------------------------------------------------- the checks together


@dataclass
class Verification:
    load_report: list[str]
    kept_checked: int
    fidelity: Fidelity | None
    reload_seconds: float


def verify(
    path: Path,
    *,
    kept: dict[str, str],
    held_out: Sequence[EncodedSample],
    references: Sequence[Any],
    device: str,
) -> Verification:
    """Reload ``path`` and run the three checks; raise ``VerificationFailed`` on a load report or a changed weight."""
    import time

    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.layout import find_layout

    start = time.perf_counter()
    try:
        checkpoint = load_checkpoint(path, dtype="auto", device=device, allow_auto_dtype=True)
    except ModelLoadError as exc:
        raise VerificationFailed(f"the quantized checkpoint does not reload: {exc}") from exc
    model, report = checkpoint.model, checkpoint.report
    del checkpoint  # only ``model`` may hold the reloaded weights: it is dropped before returning
    seconds = time.perf_counter() - start
    if report:
        raise VerificationFailed(
            f"reloading {path} reports weights that do not match the model (the saved ignore list or key names "
            "are wrong):\n  " + "\n  ".join(report.lines()[:40])
        )
    params = dict(model.named_parameters(remove_duplicate=False))  # once: each access may onload offloaded weights
    missing = [name for name in kept if name not in params]
    if missing:
        raise VerificationFailed(f"kept parameters absent after reload: {missing[:10]}")
    after = digests(model, list(kept))
    changed = [name for name, digest in kept.items() if after[name] != digest]
    if changed:
        raise VerificationFailed(
            f"{len(changed)} parameter(s) that must stay in full precision changed: {', '.join(changed[:10])}"
        )
    fidelity = measure_fidelity(find_layout(model).lm, held_out, references)
    del model
    return Verification(load_report=[], kept_checked=len(kept), fidelity=fidelity, reload_seconds=round(seconds, 3))
