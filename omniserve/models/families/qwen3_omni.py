"""Qwen3-Omni (``Qwen3OmniMoeForConditionalGeneration``): text, image, video and audio in; text (thinker) or speech.

The thinker is a Qwen3 mixture-of-experts decoder fed by Qwen3-VL's vision tower (16-pixel patches,
DeepStack features into the first decoder layers) and a Whisper-style audio encoder, with Qwen's
interleaved multimodal rotary positions. The engines serve the thinker (``loading.generating_module``)
whichever layout the folder has: the published checkpoints are full (thinker + talker + code2wav in one
``Qwen3OmniMoeForConditionalGeneration``), thinker-only folders set ``enable_audio_output: false`` (no talker
weights), and the thinker class alone is what a converted thinker checkpoint declares.

The matrix builds the thinker-only layout, as it does for Qwen2.5-Omni (training, quantizing and serving text
touch only the thinker); ``build_speaking`` writes the full layout with a tiny talker (a 2-layer MoE over a
64-code first codebook, a 2-layer code predictor for the other codebooks) and code2wav (the real 1920-sample
hop: 12.5 codes a second at 24 kHz) for the speech component (``omniserve.speech.qwen3_omni``).

The chat template is a reconstruction (``tests/fixtures/chat_templates/README.md``): Qwen's own
``chat_template.json`` for these checkpoints was not found verbatim; a real checkpoint brings its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omniserve.models.families import qwen3_vl
from omniserve.models.families.base import (
    Family,
    TextShape,
    build_atomically,
    init_model,
    save,
    token_ids,
    tokenizer_with,
)

TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    # what the talker reads of the thinker's vocabulary around the reply it speaks (ids 151671..151673 in Qwen's)
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
)
#: The tokenizer attributes ``Qwen3OmniMoeProcessor`` reads (the real tokenizer's values).
NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}
#: head_dim 32 = 16 rotary pairs over (time, height, width), interleaved: the real [24, 20, 20] scaled down.
MROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [6, 5, 5]}
#: Four experts, two per token, on every layer: both the routing and the expert weights are exercised.
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1}
AUDIO_SAMPLE_RATE = 16_000
VIDEO_FPS = 2.0
#: The first codebook's size and the code predictor's (the real ones have 2048); the talker's vocabulary adds
#: 1024 control ids above it, the range ``generate`` keeps the talker from sampling (but for the end code).
CODEBOOK = 64
CODE_GROUPS = 4  # codebooks per frame (the real 16): the talker samples the first, the code predictor the rest
#: The voices of the speaking build: the real checkpoint's three names, random timbres (talker speaker codes).
VOICES = ("chelsie", "ethan", "aiden")
_CONTROL = {  # talker control codes, at the real offsets above the first codebook (2048 + k there)
    "codec_pad_id": CODEBOOK + 100,
    "codec_bos_id": CODEBOOK + 101,
    "codec_eos_token_id": CODEBOOK + 102,
    "codec_nothink_id": CODEBOOK + 107,
    "codec_think_bos_id": CODEBOOK + 108,
    "codec_think_eos_id": CODEBOOK + 109,
}


def tokenizer() -> Any:
    return tokenizer_with(TOKENS, named=NAMED, eos="<|im_end|>", pad="<|endoftext|>")


def _special_ids(ids: Mapping[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": None,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _role_ids(tok: Any) -> dict[str, int]:
    """The first token of each role name after ``<|im_start|>``: how ``generate`` finds the user and assistant turns
    the talker reads (single tokens in Qwen's vocabulary; the tiny BPE may split them, the first piece still tells)."""
    first = {role: tok(role, add_special_tokens=False).input_ids[0] for role in ("system", "user", "assistant")}
    return {f"{role}_token_id": token for role, token in first.items()}


def thinker_config(ids: Mapping[str, int], roles: Mapping[str, int]) -> dict[str, Any]:
    text = TextShape(vocab_size=4096, extra={"rope_parameters": MROPE, **MOE, "mlp_only_layers": []}).as_dict()
    return {
        "text_config": {**text, **_special_ids(ids)},
        "vision_config": {
            **qwen3_vl.VISION_GEOMETRY,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 16,  # a 4x4 grid of learned positions, interpolated per image
            "deepstack_visual_indexes": [0],
            # not declared in transformers 5.17, but the published config carries them and vLLM reads them:
            # the learned grid's side in pixels (4 positions of 16 pixels) and that the grid is added
            "image_size": 64,
            "apply_vit_abs_pos_embed": True,
        },
        "audio_config": {
            "num_mel_bins": 128,  # WhisperFeatureExtractor(feature_size=128), as the real model
            "encoder_layers": 2,
            "encoder_attention_heads": 1,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "downsample_hidden_size": 16,
            "output_dim": text["hidden_size"],
        },
        "audio_token_id": ids["<|audio_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "user_token_id": roles["user_token_id"],
        # not a declared field, but the multimodal position code reads it
        "vision_start_token_id": ids["<|vision_start|>"],
        "tie_word_embeddings": False,
    }


def speech_configs(thinker: Mapping[str, Any], ids: Mapping[str, int]) -> dict[str, Any]:
    """Talker and code2wav sections: tiny, but the real frame geometry (8*5*4*3 * 2*2 = 1920 samples a code)."""
    hidden = thinker["text_config"]["hidden_size"]
    talker_text = {
        "vocab_size": CODEBOOK + 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rope_parameters": MROPE,
        **MOE,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,  # the talker's MoE adds a gated shared expert
    }
    talker = {
        "text_config": talker_text,
        "code_predictor_config": {
            "vocab_size": CODEBOOK,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "num_code_groups": CODE_GROUPS,
        },
        "num_code_groups": CODE_GROUPS,
        "thinker_hidden_size": hidden,
        "accept_hidden_layer": thinker["text_config"]["num_hidden_layers"],  # the last layer's output
        **_CONTROL,
        "speaker_id": {name: CODEBOOK + 200 + i for i, name in enumerate(VOICES)},
        "audio_token_id": ids["<|audio_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "audio_start_token_id": ids["<|audio_start|>"],
        "spatial_merge_size": 2,  # not a declared field, but the talker reads it (the vision tower's merge)
    }
    code2wav = {
        "codebook_size": CODEBOOK,
        "num_quantizers": CODE_GROUPS,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "decoder_dim": 64,
    }
    return {"talker_config": talker, "code2wav_config": code2wav}


def _processor(tok: Any, chat_template: str) -> Any:
    """The classes the published checkpoints name: Qwen2-VL's image and video processors with Qwen3-VL's 16-pixel
    patches (no frame timestamps in the prompt, unlike Qwen3-VL), and Whisper's feature extractor."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3OmniMoeProcessor,
        WhisperFeatureExtractor,
    )

    size = {"shortest_edge": qwen3_vl.MIN_PIXELS, "longest_edge": qwen3_vl.MAX_PIXELS}
    geometry = {
        "patch_size": qwen3_vl.VISION_GEOMETRY["patch_size"],
        "temporal_patch_size": qwen3_vl.VISION_GEOMETRY["temporal_patch_size"],
        "merge_size": qwen3_vl.VISION_GEOMETRY["spatial_merge_size"],
    }
    video_processor = Qwen2VLVideoProcessor(
        size=size,
        fps=VIDEO_FPS,
        do_sample_frames=False,  # the media layer samples frames by timestamp
        cap_pixels_per_frame=True,
        **geometry,
    )
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **geometry),
        video_processor=video_processor,
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=AUDIO_SAMPLE_RATE),
        tokenizer=tok,
        chat_template=chat_template,
    )


def _write(folder: Path, chat_template: str, seed: int, *, speaking: bool = False) -> None:
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    tok = tokenizer()
    ids = token_ids(tok, TOKENS)
    roles = _role_ids(tok)
    thinker = thinker_config(ids, roles)
    # thinker-only: the talker and code2wav sections keep the real model's defaults (config only, no weights)
    speech = speech_configs(thinker, ids) if speaking else {}
    config = Qwen3OmniMoeConfig(
        thinker_config=thinker,
        enable_audio_output=speaking,
        im_start_token_id=ids["<|im_start|>"],
        im_end_token_id=ids["<|im_end|>"],
        tts_pad_token_id=ids["<tts_pad>"],
        tts_bos_token_id=ids["<tts_text_bos>"],
        tts_eos_token_id=ids["<tts_text_eod>"],
        **roles,
        **speech,
    )
    model = init_model(Qwen3OmniMoeForConditionalGeneration, config, seed)
    if speaking:
        _init_talker_experts(model, seed)
    eos = _special_ids(ids)["eos_token_id"]
    save(folder, model, _processor(tok, chat_template), eos_ids=eos, pad_id=ids["<|endoftext|>"])


def _init_talker_experts(model: Any, seed: int) -> None:
    """Random weights for the talker's experts and routers, which transformers 5.17 leaves as ``torch.empty``
    (its ``_init_weights`` covers the thinker's MoE classes only): saved as they are, they hold NaN and the talker
    samples from NaN logits. Drawn as the thinker's are (normal, the config's ``initializer_range``)."""
    import torch

    std = model.config.talker_config.initializer_range
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.talker.model.layers:
            moe = layer.mlp
            for weight in (moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def build_speaking(output: Path, chat_template: str, *, seed: int = 0) -> Path:
    """Write a tiny full Qwen3-Omni (thinker + talker + code2wav, voices ``VOICES``) to ``output``.

    Its sound is noise; its path, rates and codebook layout are the real model's (``omniserve/speech``).
    """
    return build_atomically(Path(output), lambda folder: _write(folder, chat_template, seed, speaking=True))


FAMILY = Family(
    name="qwen3_omni",
    title="Qwen3-Omni (thinker)",
    architectures=("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration"),
    modalities=frozenset({"text", "image", "video", "audio"}),
    write=_write,
    template="qwen3_omni",
    engines=("transformers", "vllm"),
    notes=(
        "chat template reconstructed (Qwen3-VL's published template plus the audio branch), not the Hub file: "
        "real checkpoints bring their own; speech output (talker + code2wav) in tests/test_speech_qwen3_omni.py; "
        "vLLM also serves the full folder's thinker, speech beside it (tests/test_speech_qwen3_omni_vllm.py)"
    ),
)
