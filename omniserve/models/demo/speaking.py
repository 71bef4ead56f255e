"""``builtin:omni-speech``: the shipped demo thinker with a tiny talker and codec, so the demo also speaks.

The talker and codec (token2wav) have random weights from a fixed seed: the sound is noise, but the path,
rates and formats are the real model's. They are not shipped: the folder is assembled at first use from
the demo's own files (its thinker tensors copied byte for byte, so a retrained demo is picked up and
answers exactly as ``builtin:omni`` does) and cached under a name that carries a digest of the demo's
files. A build takes a few seconds and appears atomically (a hidden sibling renamed into place).

The demo's vocabulary is full (4086 learned tokens and its 10 special ones), and adding tokens would
change the trained thinker, so the talker's text-side tokens reuse the demo's specials: the reply pad is
``<|endoftext|>``, the reply start ``<|im_start|>``, its end ``<|im_end|>``, and each voice starts from
``<|im_start|>`` (voices differ by their speaker vector and reference mel). These ids only pick rows of
the thinker's embedding table for the talker's input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

#: Bump whenever what ``build_speaking_demo`` writes changes for the same demo files (part of the cache name).
SPEAKING_BUILD_VERSION = "1"
SPEAKING_MODEL_NAME = "tiny-omni-speech"
#: The talker and codec's seed (their weights are random, but the same on every build).
SEED = 0
#: Demo files taken unchanged (the rest: config.json, model.safetensors and spk_dict.pt are written anew).
_SKIPPED = {"config.json", "model.safetensors", "spk_dict.pt"}
#: The thinker's media tokens, which the talker's config names too (as the real checkpoint's does).
_MEDIA_TOKENS = (
    "<|AUDIO|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
)
#: The talker's text-side tokens, as tokens of the demo's vocabulary (see the module docstring).
_TTS_ALIASES = {
    "<|tts_pad|>": "<|endoftext|>",
    "<|tts_text_bos|>": "<|im_start|>",
    "<|tts_text_eod|>": "<|im_end|>",
    "<|tts_bos_chelsie|>": "<|im_start|>",
    "<|tts_bos_ethan|>": "<|im_start|>",
}


def speaking_demo_path(demo: Path, cache_dir: Path) -> Path:
    """The speaking demo's folder under ``cache_dir`` (``Folders.models``), built from ``demo`` on first use."""
    final = Path(cache_dir) / f"{SPEAKING_MODEL_NAME}-{SPEAKING_BUILD_VERSION}-{_digest(demo)}"
    if final.is_dir() and any(final.iterdir()):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        build_speaking_demo(demo, staging)
        staging.chmod(0o755)
        try:
            os.rename(staging, final)  # atomic; fails when another process renamed its copy first
        except OSError:
            if not (final.is_dir() and any(final.iterdir())):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def build_speaking_demo(demo: Path, output: Path) -> None:
    """Write the demo's thinker plus a seeded random talker and codec into the (empty) folder ``output``."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from omniserve.models.tiny import speech_configs, write_voices

    for item in sorted(demo.iterdir()):
        if item.is_file() and item.name not in _SKIPPED:
            shutil.copyfile(item, output / item.name)
    shipped = json.loads((demo / "config.json").read_text("utf-8"))
    thinker = Qwen2_5OmniConfig.from_pretrained(str(demo)).thinker_config
    tokenizer = AutoTokenizer.from_pretrained(str(demo))
    vocabulary = tokenizer.get_vocab()
    ids = {token: vocabulary[token] for token in _MEDIA_TOKENS}
    ids.update({alias: vocabulary[token] for alias, token in _TTS_ALIASES.items()})
    speech = speech_configs(thinker, ids)
    config = Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), enable_audio_output=True, **speech)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2_5OmniForConditionalGeneration(config)
    thinker_tensors = load_file(str(demo / "model.safetensors"))  # byte for byte: same answers as the demo
    dtype = next(iter(thinker_tensors.values())).dtype
    speech_tensors = {
        name: tensor.detach().to(dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(("talker.", "token2wav."))
    }
    save_file({**thinker_tensors, **speech_tensors}, str(output / "model.safetensors"), metadata={"format": "pt"})
    written = json.loads(config.to_json_string(use_diff=True))  # as save_pretrained writes it
    written.update({key: shipped[key] for key in ("architectures", "dtype", "transformers_version") if key in shipped})
    (output / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", "utf-8")
    write_voices(output, ids, speech["token2wav_config"], SEED)
    for item in output.iterdir():
        item.chmod(0o644)


def _digest(demo: Path) -> str:
    """Twelve hex digits of the demo's files: a retrained demo gets a new cache entry."""
    digest = hashlib.sha256()
    for item in sorted(demo.iterdir()):
        if item.is_file():
            digest.update(item.name.encode() + b"\0" + item.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
