"""SmolVLM / Idefics3 (``Idefics3ForConditionalGeneration``): images cut into tiles, each shuffled to few tokens."""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

#: The real vocabulary holds every tile marker as one token; the processor writes them around each tile.
TILE_MARKERS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *TILE_MARKERS,
)
#: 28-pixel tiles in 14-pixel patches (2x2), pixel-shuffled by 2: one token per tile.
TILE = 28
PATCH_SIZE = 14
SCALE_FACTOR = 2


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokenizer = tokenizer_with(
        TOKENS,
        named={"image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"},
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        bos="<|im_start|>",
    )
    ids = token_ids(tokenizer, TOKENS)
    eos = [ids["<end_of_utterance>"], ids["<|endoftext|>"]]
    text = TextShape(vocab_size=4096).as_dict()
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "image_size": TILE,
            "patch_size": PATCH_SIZE,
        },
        text_config={"model_type": "llama", **text, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]},
        scale_factor=SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True
        ),
        tokenizer=tokenizer,
        image_seq_len=(TILE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2,
        chat_template=chat_template,
    )
    model = init_model(Idefics3ForConditionalGeneration, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<|endoftext|>"])


FAMILY = Family(
    name="idefics3",
    title="SmolVLM / Idefics3",
    architectures=("Idefics3ForConditionalGeneration",),
    modalities=frozenset({"text", "image"}),
    write=_write,
    engines=("transformers", "vllm"),
    template="smolvlm",
)
