"""The built-in demo model: the tiny Qwen2.5-Omni, trained on the synthetic omni tasks.

It answers the questions of ``omniserve synth`` correctly (dominant colour of an image, direction a
bar moves in a clip, high or low tone, the larger of two digits, colour + tone together), so a
newcomer's first request about their image, clip or sound gets a right answer rather than noise.
Same architecture, tokenizer, chat template and processor as ``build_tiny_omni``; only the weights
differ (stored as bfloat16, 3 MB). ``docs/training.md`` has the command that reproduces them.
"""

from __future__ import annotations

from pathlib import Path

from omniserve.errors import ModelLoadError

DEMO_MODEL_NAME = "tiny-omni-demo"


def demo_model_path() -> Path:
    """The folder of the shipped demo checkpoint (package data)."""
    path = Path(__file__).resolve().parent / DEMO_MODEL_NAME
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the built-in demo model is missing from {path}; reinstall omniserve with its package data"
        )
    return path
