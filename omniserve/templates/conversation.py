"""OpenAI chat messages -> the message format HF chat templates read, plus the media to load.

Media parts become typed placeholders (``{"type": "image"}``...) in the position they appear, so
the checkpoint's own chat template decides how each is written into the prompt; the decoded
media are handed to the processor in the same order.
"""

from __future__ import annotations

import json
from typing import Any

from omniserve.media.loader import MediaSource
from omniserve.protocol import (
    AssistantMessage,
    AudioURLPart,
    ChatMessage,
    ImagePart,
    InputAudioPart,
    SystemMessage,
    TextPart,
    ToolMessage,
    VideoPart,
)

HFMessage = dict[str, Any]


def _text_only(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _media_part(part: object, param: str) -> tuple[dict[str, str], MediaSource]:
    """The placeholder carries its kind as a key too: published templates test ``'audio' in content`` (Qwen2-Audio)."""
    if isinstance(part, ImagePart):
        return {"type": "image", "image": ""}, MediaSource(kind="image", param=param, url=part.image_url.url)
    if isinstance(part, VideoPart):
        return {"type": "video", "video": ""}, MediaSource(kind="video", param=param, url=part.video_url.url)
    if isinstance(part, InputAudioPart):
        return {"type": "audio", "audio": ""}, MediaSource(
            kind="audio",
            param=param,
            inline_base64=part.input_audio.data,
            audio_format=part.input_audio.format,
        )
    if isinstance(part, AudioURLPart):
        return {"type": "audio", "audio": ""}, MediaSource(kind="audio", param=param, url=part.audio_url.url)
    raise TypeError(f"not a media part: {type(part).__name__}")


def _assistant(message: AssistantMessage) -> HFMessage:
    """An assistant turn; its calls in the shape HF templates read, arguments as a mapping.

    OpenAI sends arguments as a JSON string; templates write them with ``tojson`` (Llama, Mistral)
    or as given (Qwen), so a mapping renders right in both, as vLLM passes them too. Content null
    (a turn of calls only) becomes "": templates test it with string operations.
    """
    text = "" if message.content is None else _text_only(message.content)
    turn: HFMessage = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    return turn


def to_hf_messages(messages: list[ChatMessage]) -> tuple[list[HFMessage], list[MediaSource]]:
    """Return HF-style messages and the media sources in prompt order.

    ``developer`` is OpenAI's newer name for ``system``; templates only know ``system``.
    """
    hf: list[HFMessage] = []
    sources: list[MediaSource] = []
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            hf.append({"role": "system", "content": [{"type": "text", "text": _text_only(message.content)}]})
            continue
        if isinstance(message, AssistantMessage):
            hf.append(_assistant(message))
            continue
        if isinstance(message, ToolMessage):
            text = _text_only(message.content)
            hf.append(
                {"role": "tool", "content": [{"type": "text", "text": text}], "tool_call_id": message.tool_call_id}
            )
            continue
        content = message.content
        if isinstance(content, str):
            hf.append({"role": "user", "content": [{"type": "text", "text": content}]})
            continue
        parts: list[dict[str, str]] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            placeholder, source = _media_part(part, f"messages[{i}].content[{j}]")
            parts.append(placeholder)
            sources.append(source)
        hf.append({"role": "user", "content": parts})
    return hf, sources
