"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): text and audio (a Whisper-style encoder)."""

from __future__ import annotations

from pathlib import Path

from omniserve.models.families.base import (
    Family,
    TextShape,
    init_model,
    save,
    token_ids,
    tokenizer_with,
)

TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
NAMED = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


def _write(folder: Path, chat_template: str, seed: int) -> None:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = tokenizer_with(TOKENS, named=NAMED, eos="<|im_end|>", pad="<|endoftext|>")
    ids = token_ids(tokenizer, TOKENS)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text = TextShape(vocab_size=4096, extra={"rope_theta": 1_000_000.0, "use_sliding_window": False})
    config = Qwen2AudioConfig(
        audio_config={
            "num_mel_bins": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 1,
            "encoder_ffn_dim": 64,
            "d_model": 32,
        },
        text_config={
            "model_type": "qwen2",
            **text.as_dict(),
            "eos_token_id": eos,
            "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_index=ids["<|AUDIO|>"],
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    model = init_model(Qwen2AudioForConditionalGeneration, config, seed)
    save(
        folder,
        model,
        processor,
        eos_ids=eos,
        pad_id=ids["<|endoftext|>"],
        legacy_names=FAMILY.legacy_names,
    )


FAMILY = Family(
    name="qwen2_audio",
    title="Qwen2-Audio",
    architectures=("Qwen2AudioForConditionalGeneration",),
    modalities=frozenset({"text", "audio"}),
    write=_write,
    # transformers 5.17 writes the decoder as language_model.model.model.*; Qwen publishes language_model.model.*
    legacy_names=((r"^language_model\.model\.model\.", "language_model.model."),),
    template="qwen2_audio",
    engines=("transformers", "vllm"),
    keeps_audio_padding=True,  # its encoder raises unless input_features has all 3000 mel frames
)
