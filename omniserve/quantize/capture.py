"""Calibration inputs for the text decoder, captured from full-precision forwards of the whole model.

llm-compressor's sequential pipeline (one decoder layer at a time: what keeps GPTQ's memory to a
layer's Hessians and lets each layer see its predecessors' quantization error) works by tracing
the model's ``forward`` with torch.fx. Multimodal wrappers defeat that: Qwen2.5-Omni's thinker
traces into a single opaque call, and the pipeline then "calibrates" nothing and quantizes by
plain rounding without any error (llm-compressor only warns "Expected N subgraphs, but only
traced 1"). The text decoders themselves trace fine.

So the multimodal part runs here, in full precision, exactly as at serving time: each sample goes
through the whole language model (vision/audio towers, projectors, embedding merge, multimodal
rotary positions), and the keyword arguments that reach the decoder (``inputs_embeds``,
``position_ids``, ``attention_mask``...) are recorded at its entrance; the forward stops there.
Those recorded inputs are the calibration set llm-compressor sees, with the decoder alone as the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from omniserve.quantize.calibration import EncodedSample
from omniserve.quantize.errors import QuantizationFailed
from omniserve.quantize.layout import ModelLayout

#: Decoder arguments not worth keeping: a cache is per-forward state, and calibration needs none.
_DROP = {"past_key_values", "use_cache", "cache_position"}


class _Reached(Exception):
    """Raised at the decoder's entrance once its inputs are recorded: the rest of the forward is not needed."""


def decoder_inputs(layout: ModelLayout, samples: Sequence[EncodedSample], *, progress: bool = True) -> list[dict]:
    """The decoder's keyword arguments for each sample, as CPU tensors (one dict per sample)."""
    import torch
    from tqdm.auto import tqdm

    signature = inspect.signature(layout.decoder.forward)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    recorded: list[dict[str, Any]] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
        if var_keyword is not None:
            bound.update(bound.pop(var_keyword, {}))
        kept = {}
        for key, value in bound.items():
            if value is None or key in _DROP:
                continue
            kept[key] = value.detach().to("cpu") if isinstance(value, torch.Tensor) else value
        kept["use_cache"] = False
        recorded.append(kept)
        raise _Reached

    param = next(layout.lm.parameters())
    handle = layout.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in tqdm(samples, desc="Running samples through the towers", disable=not progress):
            inputs = sample.batch(param.device, param.dtype)
            if hasattr(layout.lm, "rope_deltas"):
                layout.lm.rope_deltas = None
            try:
                with torch.no_grad():
                    layout.lm(**inputs, use_cache=False)
            except _Reached:
                continue
            raise QuantizationFailed(
                f"the forward of {type(layout.lm).__name__} never reached its decoder "
                f"({type(layout.decoder).__name__}); cannot record calibration inputs"
            )
    finally:
        handle.remove()
    return recorded
