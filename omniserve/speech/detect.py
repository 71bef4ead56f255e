"""Whether a checkpoint folder can speak, from its ``config.json`` alone (no torch, no weights read).

One entry per model family that has a talker and codec; a folder of any other family, or one whose
config turns audio output off (omniserve's thinker-only builds, converted thinker-only checkpoints),
has no speech component and ``/v1/audio/speech`` refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

#: model_type -> module of ``omniserve.speech`` that loads and runs that family's speech half.
FAMILIES = {"qwen2_5_omni": "omniserve.speech.qwen2_5_omni", "qwen3_omni_moe": "omniserve.speech.qwen3_omni"}
#: model_type -> where its voices are: a file beside config.json (Qwen2.5-Omni's ``spk_dict.pt``) or a key path in
#: config.json (Qwen3-Omni's speaker codes). Without voices the talker has no speaker: the folder cannot speak.
VOICES = {"qwen2_5_omni": "spk_dict.pt", "qwen3_omni_moe": "config:talker_config.speaker_id"}


def speech_family(model_dir: Path) -> str | None:
    """The family module that makes ``model_dir`` speak, or None when it has no talker to load."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    module = FAMILIES.get(config.get("model_type", ""))
    if module is None or not config.get("enable_audio_output", False):
        return None
    return module if _has_voices(Path(model_dir), config, VOICES[config["model_type"]]) else None


def _has_voices(model_dir: Path, config: dict, where: str) -> bool:
    """Whether the voices ``VOICES`` names for the family are there (a file, or a non-empty config entry)."""
    if not where.startswith("config:"):
        return (model_dir / where).is_file()
    found: object = config
    for key in where.removeprefix("config:").split("."):
        found = found.get(key) if isinstance(found, dict) else None
    return bool(found)
