"""Which roles' text a chat template prints as-is: those turns get their text as a string, not as parts.

omniserve hands a multimodal template every turn's content as a list of parts (``conversation.py``), the
shape templates that interleave media iterate over. Some published templates iterate parts for one role
and print another's content as-is: GLM-4.1V walks a user turn's parts but writes ``{{ msg.content }}``
for system and assistant turns, so a list there renders as its Python repr (``[{'type': 'text', ...}]``)
in served prompts and training labels alike. vLLM decides one content format per template by looking for
a loop over ``message.content`` in the template's AST (``renderers/hf.py``, ``_detect_content_format``),
which cannot see that the loop covers one role only; here each role is decided by rendering: a one-turn
probe of that role, its content given as parts, and a look for the part's own keys in the output. Only
turns whose content is text alone are changed, so a template that iterates parts renders exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from omniserve.templates.conversation import HFMessage

#: Roles probed, each with the turns around it that templates commonly require (a user turn after a system
#: one, a user turn before an assistant's and, for templates that require it, a user turn after it).
_PROBES: dict[str, Callable[[list[dict[str, str]]], list[HFMessage]]] = {
    "system": lambda parts: [{"role": "system", "content": parts}, _user("hi")],
    "user": lambda parts: [{"role": "user", "content": parts}],
    "assistant": lambda parts: [_user("hi"), {"role": "assistant", "content": parts}, _user("and?")],
}
_MARKER = "omniserve-content-probe"


def _user(text: str) -> HFMessage:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def roles_printing_content(render: Callable[[list[HFMessage]], str]) -> frozenset[str]:
    """The roles whose content ``render`` (the chat template, generation prompt on) prints as-is.

    A probe the template refuses (``render`` raises) leaves that role as it is.
    """
    printed = set()
    for role, probe in _PROBES.items():
        parts = [{"type": "text", "text": _MARKER}]
        try:
            text = render(probe(parts))
        except Exception:  # whatever a template raises for a probe, the role keeps its parts
            continue
        if f"'text': '{_MARKER}'" in text or f'"text": "{_MARKER}"' in text:
            printed.add(role)
    return frozenset(printed)


def with_string_content(messages: Iterable[HFMessage], roles: frozenset[str]) -> list[HFMessage]:
    """``messages`` with the text-only content of turns of ``roles`` joined into a string (others untouched)."""
    if not roles:
        return list(messages)
    converted = []
    for message in messages:
        content = message.get("content")
        if message.get("role") in roles and isinstance(content, list) and all(_is_text(p) for p in content):
            message = {**message, "content": "".join(part.get("text", "") for part in content)}
        converted.append(message)
    return converted


def _is_text(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") == "text"
