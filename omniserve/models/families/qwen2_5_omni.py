"""Qwen2.5-Omni, thinker only (``Qwen2_5OmniForConditionalGeneration``): text, image, video and audio in, text out.

The tiny checkpoint is ``models.tiny``'s (the built-in demo model's architecture) with the chat
template the caller gives written over its own.
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from omniserve.models.tiny import build_tiny_omni

    build_tiny_omni(folder, seed=seed)  # the folder is empty: built beside it and renamed into it
    (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


FAMILY = Family(
    name="qwen2_5_omni",
    title="Qwen2.5-Omni (thinker)",
    # the thinker alone is what training's checkpoints and thinker-only folders declare
    architectures=(
        "Qwen2_5OmniForConditionalGeneration",
        "Qwen2_5OmniModel",
        "Qwen2_5OmniThinkerForConditionalGeneration",
    ),
    modalities=frozenset({"text", "image", "video", "audio"}),
    write=_write,
    template="qwen2_5_omni",
    engines=("transformers", "vllm"),
    notes="vLLM: the whole gateway suite runs on it in tests/test_engine_vllm.py",
)
