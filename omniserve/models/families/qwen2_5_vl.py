"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL with a windowed vision tower, absolute time ids."""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families import qwen2_vl as vl
from omniserve.models.families.base import Family, init_model, save, token_ids


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tokenizer = vl.qwen_tokenizer()
    ids = token_ids(tokenizer, vl.TOKENS)
    config = Qwen2_5_VLConfig(
        text_config=vl.text_config(ids),
        vision_config={
            **vl.VISION_GEOMETRY,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],  # layer 0 windowed, layer 1 full: both attention paths run
            "window_size": 112,
            "tokens_per_second": 2,
        },
        tie_word_embeddings=False,
        **vl.vision_token_ids(ids),
        **vl.special_ids(ids),
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=vl.image_processor(),
        video_processor=vl.video_processor(),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=vl.special_ids(ids)["eos_token_id"], pad_id=ids["<|endoftext|>"])


FAMILY = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    modalities=frozenset({"text", "image", "video"}),
    write=_write,
    engines=("transformers", "vllm"),
    template="qwen2_5_vl",
)
