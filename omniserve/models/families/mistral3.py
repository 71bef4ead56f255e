"""Mistral 3 (``Mistral3ForConditionalGeneration``, Mistral Small 3.1): a Pixtral vision tower at native resolution.

Images keep their aspect ratio: patches are merged 2x2 and each row of the grid ends in ``[IMG_BREAK]``,
the last in ``[IMG_END]`` (the processor writes them; training aligns its masks across them).
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

TOKENS = (
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)
#: 14-pixel patches merged 2x2; images at most 56 pixels a side: at most 2x2 tokens plus row markers.
PATCH_SIZE = 14
MERGE = 2
LONGEST_EDGE = 56


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tokenizer = tokenizer_with(TOKENS, named={"image_token": "[IMG]"}, eos="</s>", pad="<pad>", bos="<s>")
    ids = token_ids(tokenizer, TOKENS)
    text = TextShape(vocab_size=4096).as_dict()
    config = Mistral3Config(
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "head_dim": 32,
            "image_size": LONGEST_EDGE,
            "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "mistral",
            **text,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
            "sliding_window": None,
        },
        image_token_index=ids["[IMG]"],
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": LONGEST_EDGE}, patch_size=PATCH_SIZE),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE,
        chat_template=chat_template,
    )
    model = init_model(Mistral3ForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=[ids["</s>"]], pad_id=ids["<pad>"])


FAMILY = Family(
    name="mistral3",
    title="Mistral 3 (Pixtral vision)",
    architectures=("Mistral3ForConditionalGeneration",),
    modalities=frozenset({"text", "image"}),
    write=_write,
    template="mistral3",
    engines=("transformers", "vllm"),
)
