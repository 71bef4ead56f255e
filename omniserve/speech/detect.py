"""Whether a checkpoint folder can speak, from its ``config.json`` alone (no torch, no weights read).

One entry per model family that has a talker and codec; a folder of any other family, or one whose
config turns audio output off (omniserve's thinker-only builds, converted thinker-only checkpoints),
has no speech component and ``/v1/audio/speech`` refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

#: model_type -> module of ``omniserve.speech`` that loads and runs that family's speech half.
FAMILIES = {"qwen2_5_omni": "omniserve.speech.qwen2_5_omni"}


def speech_family(model_dir: Path) -> str | None:
    """The family module that makes ``model_dir`` speak, or None when it has no talker to load."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    module = FAMILIES.get(config.get("model_type", ""))
    if module is None or not config.get("enable_audio_output", False):
        return None
    if not (Path(model_dir) / "spk_dict.pt").is_file():  # the voices: without them the talker has no speaker
        return None
    return module
