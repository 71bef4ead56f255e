"""Checkpoints omniserve can build itself: tiny random-weight models for the default deploy and tests.

Importing this package stays cheap (no torch or transformers) so the CLI starts fast.
"""

from omniserve.models.tiny import (
    TINY_OMNI_VERSION,
    build_tiny_omni,
    build_tiny_qwen2,
    build_tiny_qwen2_vl,
    ensure_tiny_omni,
    omni_videos_kwargs,
)
from omniserve.models.tokenizer import train_tiny_tokenizer

__all__ = [
    "TINY_OMNI_VERSION",
    "build_tiny_omni",
    "build_tiny_qwen2",
    "build_tiny_qwen2_vl",
    "ensure_tiny_omni",
    "omni_videos_kwargs",
    "train_tiny_tokenizer",
]
