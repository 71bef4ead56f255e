"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, any-resolution image tiles, video.

Images are cut into tiles on the checkpoint's ``image_grid_pinpoints`` (here 28-pixel tiles, at most 2x2)
plus a base view; video frames are pooled 2x2. The decoder is Qwen2's, with Qwen's chat tokens.
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

TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
#: 28-pixel views in 14-pixel patches: 4 tokens per view (SigLIP has no CLS token: strategy "full").
VIEW = 28
PATCH_SIZE = 14
PINPOINTS = [[VIEW, VIEW], [VIEW, 2 * VIEW], [2 * VIEW, VIEW], [2 * VIEW, 2 * VIEW]]


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = tokenizer_with(
        TOKENS, named={"image_token": "<image>", "video_token": "<video>"}, eos="<|im_end|>", pad="<|endoftext|>"
    )
    ids = token_ids(tokenizer, TOKENS)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text = TextShape(vocab_size=4096, extra={"rope_theta": 1_000_000.0, "use_sliding_window": False}).as_dict()
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": VIEW,
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        text_config={"model_type": "qwen2", **text, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]},
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=False,
    )
    size = {"height": VIEW, "width": VIEW}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        tokenizer=tokenizer,
        num_image_tokens=(VIEW // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chat_template,
    )
    model = init_model(LlavaOnevisionForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<|endoftext|>"], legacy_names=FAMILY.legacy_names)


FAMILY = Family(
    name="llava_onevision",
    title="LLaVA-OneVision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    legacy_names=(TOWER_VISION_MODEL,),
    template="llava_onevision",
    engines=("transformers", "vllm"),
)
