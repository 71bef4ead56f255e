"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): text, image, video; multimodal rotary positions.

The Qwen vision pieces (tokens, image and video processors) are shared with Qwen2.5-VL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

#: Pixel bounds per image or video frame: a 64x64 input costs 4 tokens.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
VIDEO_FPS = 2.0
#: 14-pixel patches, 2 frames per temporal patch, 2x2 patches per token.
VISION_GEOMETRY = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}
#: head_dim 32 = 16 rotary pairs split over (time, height, width) as the real models' 1:1.5:1.5.
MROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]}
TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}


def qwen_tokenizer() -> Any:
    return tokenizer_with(TOKENS, named=NAMED, eos="<|im_end|>", pad="<|endoftext|>")


def text_config(ids: dict[str, int]) -> dict[str, Any]:
    shape = TextShape(vocab_size=4096, extra={"rope_parameters": MROPE, "use_sliding_window": False})
    return {**shape.as_dict(), **special_ids(ids)}


def special_ids(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": None,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }


def image_processor() -> Any:
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=VISION_GEOMETRY["patch_size"],
        temporal_patch_size=VISION_GEOMETRY["temporal_patch_size"],
        merge_size=VISION_GEOMETRY["spatial_merge_size"],
    )


def video_processor() -> Any:
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=VISION_GEOMETRY["patch_size"],
        temporal_patch_size=VISION_GEOMETRY["temporal_patch_size"],
        merge_size=VISION_GEOMETRY["spatial_merge_size"],
        fps=VIDEO_FPS,
        do_sample_frames=False,  # the media layer samples frames by timestamp
        cap_pixels_per_frame=True,
    )


def vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tokenizer = qwen_tokenizer()
    ids = token_ids(tokenizer, TOKENS)
    config = Qwen2VLConfig(
        text_config=text_config(ids),
        vision_config={
            **VISION_GEOMETRY,
            "depth": 2,
            "embed_dim": 32,
            "mlp_ratio": 2,
            "num_heads": 1,
            "hidden_size": 128,
        },
        tie_word_embeddings=False,
        **vision_token_ids(ids),
        **special_ids(ids),
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor(),
        video_processor=video_processor(),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(Qwen2VLForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=special_ids(ids)["eos_token_id"], pad_id=ids["<|endoftext|>"])


FAMILY = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    architectures=("Qwen2VLForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    engines=("transformers", "vllm"),
    template="qwen2_vl",
)
