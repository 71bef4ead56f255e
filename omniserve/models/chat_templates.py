"""Qwen-style chat templates for the tiny checkpoints, one per architecture.

All three share one shape, built by :func:`qwen_chat_template`: ``<|im_start|>role\\n...<|im_end|>\\n``
per message, no default system prompt, media placeholders where the parts appear in the content
list, and ``<|im_start|>assistant\\n`` for ``add_generation_prompt``. Assistant content and its
``<|im_end|>`` sit inside ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks exactly
what a model is trained to produce. A part type the model cannot take raises instead of vanishing.

The content loop reads ``message['content']`` directly (not through a macro): vLLM decides from that
loop that the template takes OpenAI-style part lists rather than flattened strings.

With ``tools=True`` (the Omni template, so the demo model can learn to call functions) the template
renders ``tools``, assistant ``tool_calls`` and ``role: "tool"`` results the way Qwen2.5 publishes
them (the Hermes format): the tool signatures as JSON in ``<tools>`` inside the system turn, each call
as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` inside the assistant's
``{% generation %}`` block (calls are learned), and consecutive results in one user turn of
``<tool_response>`` blocks (never learned). Without tools in a request the output is unchanged.
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


#: The system text before the tool signatures, as Qwen2.5 writes it.
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FORMAT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
#: Message branches of the tool-aware template (``rendered`` holds the message's content).
_TOOL_MESSAGES = (
    "{%- if message['role'] == 'system' and loop.first and tools -%}\n"
    "{{- '<|im_start|>system\\n' + rendered + '\\n\\n' + tools_text + '<|im_end|>\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- generation -%}{{- rendered -}}\n"
    "{%- for call in message['tool_calls'] or [] -%}\n"
    "{%- set call = call['function'] if call['function'] is defined else call -%}\n"
    "{%- if rendered or not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}\n"
    "{{- call['arguments'] if call['arguments'] is string else call['arguments'] | tojson -}}\n"
    "{{- '}\\n</tool_call>' -}}\n"
    "{%- endfor -%}{{- '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}\n"
    "{%- elif message['role'] == 'tool' -%}\n"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}\n"
    "{{- '\\n<tool_response>\\n' + rendered + '\\n</tool_response>' -}}\n"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + rendered + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
)
_PLAIN_MESSAGES = (
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{%- generation -%}{{- rendered + '<|im_end|>' -}}{%- endgeneration -%}\n"
    "{%- else -%}{{- rendered + '<|im_end|>' -}}\n"
    "{%- endif -%}\n"
    "{{- '\\n' -}}\n"
)
_TOOLS_HEADER = (
    # set at the top level, not inside an if: a variable assigned in a block reads as one the caller gives
    f"{{%- set tools_text = ({_TOOLS_PREAMBLE!r} + '\\n' + (tools | map('tojson') | join('\\n'))"
    f" + {_TOOLS_FORMAT!r}) if tools else '' -%}}\n"
    "{%- if tools and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + tools_text + '<|im_end|>\\n' -}}{%- endif -%}\n"
)


def qwen_chat_template(placeholders: Mapping[str, str], model_name: str, *, tools: bool = False) -> str:
    """Build the template for a model taking the media in ``placeholders`` (text is always taken).

    ``tools``: render tools, tool calls and tool results in the Hermes format (see the module docstring).
    """
    branches = "".join(
        f"{{%- elif part['type'] in {list(PART_TYPES[modality])!r} -%}}{{{{- {placeholder!r} -}}}}\n"
        for modality, placeholder in placeholders.items()
    )
    unsupported = f"{model_name} does not accept content parts of type "
    return (
        (_TOOLS_HEADER if tools else "") + "{%- for message in messages -%}\n"
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
        "{%- endset -%}\n" + (_TOOL_MESSAGES if tools else _PLAIN_MESSAGES) + "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )


QWEN2_CHAT_TEMPLATE = qwen_chat_template({}, "Qwen2")
QWEN2_VL_CHAT_TEMPLATE = qwen_chat_template(QWEN2_VL_PLACEHOLDERS, "Qwen2-VL")
QWEN2_5_OMNI_CHAT_TEMPLATE = qwen_chat_template(QWEN2_5_OMNI_PLACEHOLDERS, "Qwen2.5-Omni", tools=True)
