"""Tiny random-weight checkpoints, built offline and byte-for-byte reproducibly.

They are the built-in default model of ``omniserve deploy`` and the models of the test-suite: real
architectures (so transformers and vLLM load them unmodified) with full processors, shrunk until a
build takes seconds and a multimodal generation well under one. Their output is noise; what they
prove is that every path (tokenizer, chat template, image/video/audio processing, generation) works.

Every text decoder uses 4 heads of 32 dimensions because vLLM's CPU attention rejects ``head_dim=16``;
the vision and audio towers use one 32-dimension head for the same reason. Weights are float32, the
fastest dtype on CPUs without native bf16.

Same bytes on every run for a given version of this module and of torch/transformers: fixed seeds,
a tokenizer trained on generated text, and no timestamps in any file. Folders appear atomically
(built in a hidden sibling, then renamed), so a reader never sees half a checkpoint.

Processor caveat (transformers 5.x): ``Qwen2_5OmniProcessor`` carries class-level ``videos_kwargs``
defaults (``size`` 128*28*28..768*28*28 pixels) that override the saved video processor's ``size``.
Callers must pass ``videos_kwargs=omni_videos_kwargs(processor)`` (see that function) for the saved
pixel bounds and fps to apply. Images and audio, and every Qwen2-VL setting, apply as saved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omniserve.models.chat_templates import (
    QWEN2_5_OMNI_CHAT_TEMPLATE,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
)
from omniserve.models.tokenizer import TINY_VOCAB_SIZE, train_tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

#: Part of the cache folder name of the built-in model: bump whenever the builders' output changes.
TINY_OMNI_VERSION = "2"

MAX_POSITIONS = 8192
#: Pixel bounds per image or video frame: a 64x64 input costs 4 tokens, a 448x448 one 256.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
VIDEO_FPS = 2.0
AUDIO_SAMPLE_RATE = 16_000

# The text decoder shared by all three models. mrope_section splits head_dim/2 = 16 rotary pairs
# over (time, height, width) in the real models' 1:1.5:1.5 ratio.
_TEXT = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}
_ROPE_THETA = 1_000_000.0
_MROPE = {"rope_type": "default", "rope_theta": _ROPE_THETA, "mrope_section": [4, 6, 6]}
# Qwen's vision geometry: 14-pixel patches, 2 frames per temporal patch, 2x2 patches per token.
_VISION_GEOMETRY = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}

_QWEN_BASE_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_OMNI_TOKENS = (
    *_QWEN_BASE_TOKENS,
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
)
# The attribute names Qwen2_5OmniProcessor reads from its tokenizer.
_OMNI_NAMED = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
_VL_TOKENS = (
    *_QWEN_BASE_TOKENS,
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_VL_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}


# --------------------------------------------------------------------------- public API


def build_tiny_omni(output: Path, *, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-Omni (thinker only: text, image, video, audio in; text out) to ``output``."""
    return _build_atomically(Path(output), lambda folder: _write_omni(folder, seed))


def build_tiny_omni_speaking(output: Path, *, seed: int = 0) -> Path:
    """Write a tiny full Qwen2.5-Omni (thinker + talker + token2wav, two voices) to ``output``.

    The same thinker as ``build_tiny_omni`` plus the speech half: a 2-layer talker over a 64-code codec
    and a 2-layer DiT + small BigVGAN (the real 240-sample hop, so 24 kHz audio at 50 codes a second).
    Its sound is noise; its path, rates and formats are the real model's (``omniserve/speech``).
    """
    return _build_atomically(Path(output), lambda folder: _write_omni(folder, seed, speaking=True))


def build_tiny_qwen2_vl(output: Path, *, seed: int = 0, text: Mapping[str, Any] | None = None) -> Path:
    """Write a tiny Qwen2-VL (text, image, video in; text out) to ``output``.

    ``text`` overrides the text model's shape (hidden_size, num_hidden_layers, ...): benchmarks build a
    medium model this way, with the same tokenizer and processors as the tiny one.
    """
    return _build_atomically(Path(output), lambda folder: _write_qwen2_vl(folder, seed, text or {}))


def build_tiny_qwen2(output: Path, *, seed: int = 0) -> Path:
    """Write a tiny text-only Qwen2 causal LM to ``output``."""
    return _build_atomically(Path(output), lambda folder: _write_qwen2(folder, seed))


def ensure_tiny_omni(cache_dir: Path) -> Path:
    """Return the built-in model's folder under ``cache_dir`` (``Folders.models``), building it on first use.

    Concurrent callers may both build; the first rename wins and the others discard their copy, so
    the folder is complete whenever it exists.
    """
    final = Path(cache_dir) / f"tiny-omni-{TINY_OMNI_VERSION}"
    return _build_atomically(final, lambda folder: _write_omni(folder, seed=0), reuse=True)


def omni_videos_kwargs(processor: ProcessorMixin) -> dict[str, Any]:
    """The ``videos_kwargs`` a Qwen2.5-Omni processor call needs for the saved video settings to apply.

    ``Qwen2_5OmniProcessorKwargs._defaults`` injects a ``size`` of 128*28*28..768*28*28 pixels
    that outranks the video processor's saved ``size``, and the processor takes ``fps`` (for the
    temporal position ids) only from the call, falling back to 2.0. Pass the result as
    ``processor(..., videos_kwargs=omni_videos_kwargs(processor))``; ``fps`` must be the rate the
    frames were actually sampled at when it differs from the saved one.
    """
    video_processor = processor.video_processor
    size = video_processor.size
    fps = getattr(video_processor, "fps", None) or VIDEO_FPS
    return {"size": {"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge}, "fps": fps}


# --------------------------------------------------------------------------- per-architecture writers


def _write_omni(folder: Path, seed: int, *, speaking: bool = False) -> None:
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniProcessor,
        Qwen2_5OmniThinkerConfig,
    )

    tokenizer = _tokenizer((*_OMNI_TOKENS, *_TTS_TOKENS) if speaking else _OMNI_TOKENS, _OMNI_NAMED)
    ids = _token_ids(tokenizer)
    thinker = Qwen2_5OmniThinkerConfig(
        text_config={**_TEXT, "rope_parameters": _MROPE, **_special_ids(ids)},
        vision_config={
            **_VISION_GEOMETRY,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "out_hidden_size": _TEXT["hidden_size"],
            # Layer 0 windowed, layer 1 full: both attention paths of the real tower run.
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "tokens_per_second": 25,  # read by vLLM for the temporal position ids
        },
        audio_config={
            "num_mel_bins": 128,  # WhisperFeatureExtractor(feature_size=128), as the real Omni
            "encoder_layers": 2,
            "encoder_attention_heads": 1,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "output_dim": _TEXT["hidden_size"],
        },
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        # Not declared fields, but the mRoPE code of transformers and vLLM reads them.
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
        tie_word_embeddings=False,
        **_special_ids(ids),
    )
    # Talker and token2wav stay out: no weights are created or saved; the config still carries their
    # sections with the real model's defaults, as Qwen2_5OmniConfig requires.
    speech = speech_configs(thinker, ids) if speaking else {}
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=speaking, **speech)
    processor = Qwen2_5OmniProcessor(
        image_processor=_image_processor(),
        video_processor=_video_processor(),
        feature_extractor=_feature_extractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
    )
    model = _init_model(Qwen2_5OmniForConditionalGeneration, config, seed)
    _save(folder, model, processor, ids)
    if speaking:
        write_voices(folder, ids, speech["token2wav_config"], seed)
    else:
        _write_speaker_dict(folder)


# The talker reads these thinker-vocabulary tokens (text bos/eos/pad of the reply it speaks, one start
# token per voice); the real checkpoint has them among its 151k tokens.
_TTS_TOKENS = ("<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>", "<|tts_bos_chelsie|>", "<|tts_bos_ethan|>")
#: The voices of the speaking model: the real Qwen2.5-Omni's two names, random timbres.
TINY_VOICES = {"Chelsie": "<|tts_bos_chelsie|>", "Ethan": "<|tts_bos_ethan|>"}
_CODEC_CODES = 60  # codec codes 0..59, then pad (also an end), start, end, mask
_MEL_DIM = 80  # DiT output = BigVGAN input
_SPEAKER_DIM = 32  # the DiT's speaker-embedding width (the "cond" vector of each voice)


def speech_configs(thinker: Any, ids: Mapping[str, int]) -> dict[str, Any]:
    """Talker and token2wav sections for ``Qwen2_5OmniConfig``: tiny, but the real frame geometry.

    The codec vocabulary is cut to 64 so that every code a random talker can sample is a valid DiT
    embedding (the real 8448-entry vocabulary has ids above the DiT's 8193 that a trained talker never
    emits). BigVGAN keeps the real upsampling rates (5*3*2*2*2*2 = 240 samples per mel frame, two mel
    frames per code): 24 kHz and 50 codes per second, as the real model.
    """
    text = thinker.text_config
    talker = {
        "vocab_size": _CODEC_CODES + 4,
        "tts_codec_pad_token_id": _CODEC_CODES,
        "tts_codec_start_token_id": _CODEC_CODES + 1,
        "tts_codec_end_token_id": _CODEC_CODES + 2,
        "tts_codec_mask_token_id": _CODEC_CODES + 3,
        "tts_text_pad_token_id": ids["<|tts_pad|>"],
        "tts_text_start_token_id": ids["<|tts_text_bos|>"],
        "tts_text_end_token_id": ids["<|tts_text_eod|>"],
        "embedding_size": text.hidden_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_parameters": _MROPE,
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
    }
    token2wav = {
        "dit_config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 32,
            "ff_mult": 2,
            "emb_dim": 32,
            "look_ahead_layers": [1],
            "look_backward_layers": [0],
            "num_embeds": _CODEC_CODES + 4,
            "mel_dim": _MEL_DIM,
            "enc_emb_dim": _SPEAKER_DIM,
            "enc_dim": 32,
            "enc_channels": [32, 32, 32, 32, 96],
            "enc_attention_channels": 16,
            "enc_se_channels": 16,
            "max_position_embeddings": MAX_POSITIONS,
        },
        "bigvgan_config": {
            "mel_dim": _MEL_DIM,
            "upsample_initial_channel": 64,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
        },
    }
    return {"talker_config": talker, "token2wav_config": token2wav}


def write_voices(folder: Path, ids: Mapping[str, int], token2wav: Mapping[str, Any], seed: int) -> None:
    """``spk_dict.pt`` as the real checkpoint lays it out: per voice a talker start token (``bos_token``),
    the DiT's speaker vector (``cond``) and a reference mel spectrogram (``ref_mel``, frames x mel bins)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    voices = {
        name: {
            "bos_token": ids[token],
            "cond": torch.randn(token2wav["dit_config"]["enc_emb_dim"], generator=generator),
            "ref_mel": torch.randn(100, _MEL_DIM, generator=generator),
        }
        for name, token in TINY_VOICES.items()
    }
    torch.save(voices, folder / "spk_dict.pt")


def _write_qwen2_vl(folder: Path, seed: int, text: Mapping[str, Any]) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tokenizer = _tokenizer(_VL_TOKENS, _VL_NAMED)
    ids = _token_ids(tokenizer)
    text_config = {**_TEXT, **text}
    config = Qwen2VLConfig(
        text_config={**text_config, "rope_parameters": _mrope_for(text_config), **_special_ids(ids)},
        vision_config={
            **_VISION_GEOMETRY,
            "depth": 2,
            "embed_dim": 32,
            "mlp_ratio": 2,
            "num_heads": 1,
            "hidden_size": text_config["hidden_size"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        **_special_ids(ids),
    )
    processor = Qwen2VLProcessor(
        image_processor=_image_processor(),
        video_processor=_video_processor(),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    model = _init_model(Qwen2VLForConditionalGeneration, config, seed)
    _save(folder, model, processor, ids)


def _mrope_for(text_config: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen's multimodal rope split (temporal 1/4, height and width 3/8 each of the half head dim)."""
    half = text_config["hidden_size"] // text_config["num_attention_heads"] // 2
    temporal = half // 4  # the tiny models' half head dim of 16 gives _MROPE's [4, 6, 6]
    return {**_MROPE, "mrope_section": [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]}


def _write_qwen2(folder: Path, seed: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tokenizer(_QWEN_BASE_TOKENS, {})
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    ids = _token_ids(tokenizer)
    config = Qwen2Config(
        **_TEXT, rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA}, **_special_ids(ids)
    )
    model = _init_model(Qwen2ForCausalLM, config, seed)
    _save(folder, model, tokenizer, ids)


# --------------------------------------------------------------------------- shared pieces


def _tokenizer(special_tokens: tuple[str, ...], named: Mapping[str, str]) -> PreTrainedTokenizerBase:
    return train_tiny_tokenizer(special_tokens, named_tokens=named, model_max_length=MAX_POSITIONS)


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the special tokens, by content (they are all atomic added tokens)."""
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}


def _special_ids(ids: Mapping[str, int]) -> dict[str, Any]:
    """bos/eos/pad ids for the decoder configs.

    Both stop tokens go in the config too, not only in generation_config.json: the Omni thinker takes
    its generation config from its own config, never from the saved file.
    """
    return {"bos_token_id": None, "eos_token_id": _eos_ids(ids), "pad_token_id": ids["<|endoftext|>"]}


def _eos_ids(ids: Mapping[str, int]) -> list[int]:
    """``<|im_end|>`` ends a chat turn; ``<|endoftext|>`` ends raw completions."""
    return [ids["<|im_end|>"], ids["<|endoftext|>"]]


def _image_processor() -> Any:
    from transformers import Qwen2VLImageProcessor

    # A fresh ``size`` dict: passing min_pixels/max_pixels instead mutates the class-level default.
    return Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=_VISION_GEOMETRY["patch_size"],
        temporal_patch_size=_VISION_GEOMETRY["temporal_patch_size"],
        merge_size=_VISION_GEOMETRY["spatial_merge_size"],
    )


def _video_processor() -> Any:
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=_VISION_GEOMETRY["patch_size"],
        temporal_patch_size=_VISION_GEOMETRY["temporal_patch_size"],
        merge_size=_VISION_GEOMETRY["spatial_merge_size"],
        fps=VIDEO_FPS,
        # Frames arrive already sampled (decoded at ``fps`` by the media layer), so no resampling here.
        do_sample_frames=False,
        # The reference (qwen-vl-utils) total-pixel bound; also silences the "default will change" warning.
        cap_pixels_per_frame=True,
    )


def _feature_extractor(feature_size: int) -> Any:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=feature_size, sampling_rate=AUDIO_SAMPLE_RATE)


def _init_model(model_class: type[PreTrainedModel], config: Any, seed: int) -> PreTrainedModel:
    """Random float32 weights from ``seed``, without disturbing the caller's global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
    return model.eval()


def _save(folder: Path, model: PreTrainedModel, processor: Any, ids: Mapping[str, int]) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=_eos_ids(ids), pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def _write_speaker_dict(folder: Path) -> None:
    """``Qwen2_5OmniForConditionalGeneration.from_pretrained`` refuses a folder without ``spk_dict.pt``.

    Its speakers only condition the talker, which these models leave out, so an empty mapping is enough.
    ``torch.save`` names its archive after the file and derives the record id from the content:
    the bytes are the same on every run.
    """
    import torch

    torch.save({}, folder / "spk_dict.pt")


def _build_atomically(output: Path, write: Callable[[Path], None], *, reuse: bool = False) -> Path:
    """Run ``write`` into a hidden sibling of ``output`` and rename it into place when complete.

    A populated ``output`` is an error, or with ``reuse`` the result (also when it appears while we
    build: then another process won the race and our copy is dropped).
    """
    if _is_populated(output):
        if reuse:
            return output
        raise FileExistsError(f"{output} exists and is not empty")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        write(staging)
        _make_readable(staging)
        try:
            os.rename(staging, output)  # atomic; replaces an empty folder, fails on a populated one
        except OSError:
            if not (reuse and _is_populated(output)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _make_readable(folder: Path) -> None:
    """``mkdtemp`` and transformers' shard writer create owner-only entries; a model folder is shared data."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _is_populated(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())
