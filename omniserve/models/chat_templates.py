"""Qwen-style chat templates for the tiny checkpoints, one per architecture.

All three share one shape, built by :func:`qwen_chat_template`: ``<|im_start|>role\\n...<|im_end|>\\n``
per message, no default system prompt, media placeholders where the parts appear in the content
list, and ``<|im_start|>assistant\\n`` for ``add_generation_prompt``. Assistant content and its
``<|im_end|>`` sit inside ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks exactly
what a model is trained to produce. A part type the model cannot take raises instead of vanishing.

The content loop reads ``message['content']`` directly (not through a macro): vLLM decides from that
loop that the template takes OpenAI-style part lists rather than flattened strings.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Part types accepted for each modality (the OpenAI wire names as aliases of the short ones).
PART_TYPES: Mapping[str, tuple[str, ...]] = {
    "image": ("image", "image_url"),
    "video": ("video", "video_url"),
    "audio": ("audio", "audio_url", "input_audio"),
}

#: What each media part becomes, per architecture (what its processor expands into feature tokens).
QWEN2_5_OMNI_PLACEHOLDERS: Mapping[str, str] = {
    "image": "<|vision_bos|><|IMAGE|><|vision_eos|>",
    "video": "<|vision_bos|><|VIDEO|><|vision_eos|>",
    "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>",
}
QWEN2_VL_PLACEHOLDERS: Mapping[str, str] = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
}


def qwen_chat_template(placeholders: Mapping[str, str], model_name: str) -> str:
    """Build the template for a model taking the media in ``placeholders`` (text is always taken)."""
    branches = "".join(
        f"{{%- elif part['type'] in {list(PART_TYPES[modality])!r} -%}}{{{{- {placeholder!r} -}}}}\n"
        for modality, placeholder in placeholders.items()
    )
    unsupported = f"{model_name} does not accept content parts of type "
    return (
        "{%- for message in messages -%}\n"
        "{%- set rendered -%}\n"
        "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
        "{%- elif message['content'] is not none -%}\n"
        "{%- for part in message['content'] -%}\n"
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}\n"
        f"{branches}"
        f"{{%- else -%}}{{{{- raise_exception({unsupported!r} ~ part['type']) -}}}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- endif -%}\n"
        "{%- endset -%}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
        "{%- if message['role'] == 'assistant' -%}\n"
        "{%- generation -%}{{- rendered + '<|im_end|>' -}}{%- endgeneration -%}\n"
        "{%- else -%}{{- rendered + '<|im_end|>' -}}\n"
        "{%- endif -%}\n"
        "{{- '\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )


QWEN2_CHAT_TEMPLATE = qwen_chat_template({}, "Qwen2")
QWEN2_VL_CHAT_TEMPLATE = qwen_chat_template(QWEN2_VL_PLACEHOLDERS, "Qwen2-VL")
QWEN2_5_OMNI_CHAT_TEMPLATE = qwen_chat_template(QWEN2_5_OMNI_PLACEHOLDERS, "Qwen2.5-Omni")
