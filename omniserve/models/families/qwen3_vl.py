"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): text, image, video; a Qwen3 decoder fed DeepStack vision features.

The vision tower takes 16-pixel patches (Qwen2-VL's are 14) with learned position embeddings, and
hands features from intermediate layers to the first decoder layers ("DeepStack"); the processor
writes each video frame pair's timestamp (``<t seconds>``) before its tokens. The chat tokens and the
image processor class are Qwen2-VL's.

The template layer hands the processor each video's frame timing (``DecodedVideo.metadata``), so the
timestamps are the clip's own on every engine, and vLLM's prompt equals the template layer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniserve.models.families import qwen2_vl as vl
from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids

#: 16-pixel patches, 2 frames per temporal patch, 2x2 patches per token: a 64x64 image costs 4 tokens.
VISION_GEOMETRY = {"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}
MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 256 * 32 * 32
#: head_dim 32 = 16 rotary pairs over (time, height, width), interleaved as Qwen3-VL does.
MROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}


def _processors() -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    geometry = {
        "patch_size": VISION_GEOMETRY["patch_size"],
        "temporal_patch_size": VISION_GEOMETRY["temporal_patch_size"],
        "merge_size": VISION_GEOMETRY["spatial_merge_size"],
    }
    video = Qwen3VLVideoProcessor(
        size=size,
        fps=vl.VIDEO_FPS,
        do_sample_frames=False,  # the media layer samples frames by timestamp
        cap_pixels_per_frame=True,
        **geometry,
    )
    return Qwen2VLImageProcessor(size=size, **geometry), video


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tokenizer = vl.qwen_tokenizer()
    ids = token_ids(tokenizer, vl.TOKENS)
    text = TextShape(vocab_size=4096, extra={"rope_parameters": MROPE}).as_dict()
    config = Qwen3VLConfig(
        text_config={**text, **vl.special_ids(ids)},
        vision_config={
            **VISION_GEOMETRY,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "out_hidden_size": 128,
            "num_position_embeddings": 16,  # a 4x4 grid of learned positions, interpolated per image
            "deepstack_visual_indexes": [0],  # layer 0's features join the decoder's first layer
        },
        tie_word_embeddings=False,
        **vl.vision_token_ids(ids),
    )
    image_processor, video_processor = _processors()
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(Qwen3VLForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=vl.special_ids(ids)["eos_token_id"], pad_id=ids["<|endoftext|>"])


FAMILY = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    architectures=("Qwen3VLForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    template="qwen3_vl",
    engines=("transformers", "vllm"),
)
