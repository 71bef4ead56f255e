"""The saved ``ignore`` list: every kept layer named so that each reader of the checkpoint finds it.

Three readers, three naming schemes for the same layer:

- transformers 5 applies the config to **in-memory** names (``model.visual.blocks.0.attn.qkv`` for
  Qwen2-VL, ``thinker.visual.blocks.0.attn.q`` for Qwen2.5-Omni);
- compressed-tensors 0.19 writes the **checkpoint** key names (``visual.blocks.0.attn.qkv``), for vLLM;
- vLLM matches its **own** module names, after stripping prefixes and fusing layers: Qwen2.5-Omni's
  vision ``q``/``k``/``v`` become one ``visual.blocks.0.attn.qkv`` that appears in neither list.

A kept layer missing from one reader's form is taken for quantized: transformers then reports its
weights MISSING/UNEXPECTED (silently random), vLLM tries int4 kernels on a 32-wide tower layer.
So the list holds both exact forms plus, per kept component (a tower, a projector, ``lm_head``),
one pattern ``re:(.*\\.)?<component>(\\..*)?$`` that matches it under any prefix and any fusion, added
only when it matches no quantized layer. Entries that match nothing are ignored by every reader.
"""

from __future__ import annotations

import re
from typing import Any


def saved_ignore(existing: list[str], model: Any, decoder_name: str) -> tuple[list[str], list[str]]:
    """The ignore list to save (``existing`` plus what is missing) and the kept layers' in-memory names."""
    quantized = [name for name, m in model.named_modules() if hasattr(m, "quantization_scheme")]
    quantized_types = {type(m).__name__ for m in model.modules() if hasattr(m, "quantization_scheme")}
    kept = [
        name
        for name, module in model.named_modules()
        if type(module).__name__ in quantized_types and not hasattr(module, "quantization_scheme")
    ]
    ignore = list(existing)
    ignore += [name for name in kept if name not in ignore]
    for pattern in component_patterns(kept, decoder_name):
        regex = re.compile(pattern.removeprefix("re:"))
        if pattern not in ignore and not any(regex.match(name) for name in quantized):
            ignore.append(pattern)
    return ignore, kept


def component_patterns(kept: list[str], decoder_name: str) -> list[str]:
    """One prefix- and fusion-proof pattern per kept component (the outermost module not holding the decoder)."""
    roots: list[str] = []
    for name in kept:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if decoder_name != prefix and not decoder_name.startswith(prefix + "."):
                if prefix not in roots:
                    roots.append(prefix)
                break
    return [rf"re:(.*\.)?{re.escape(root.rsplit('.', 1)[-1])}(\..*)?$" for root in roots]
