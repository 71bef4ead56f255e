"""Which roles' text a chat template prints as-is: those turns get their text as a string, not as parts.

omniserve hands a multimodal template every turn's content as a list of parts (``conversation.py``), the
shape templates that interleave media iterate over. Some published templates iterate parts for one role
and print another's content as-is: GLM-4.1V walks a user turn's parts but writes ``{{ msg.content }}``
for system and assistant turns, so a list there renders as its Python repr (``[{'type': 'text', ...}]``)
in served prompts and training labels alike. vLLM decides one content format per template by looking for
a loop over ``message.content`` in the template's AST (``renderers/hf.py``, ``_detect_content_format``),
which cannot see that the loop covers one role only; here each role is decided by rendering: a one-turn
probe of that role, its content given as parts, and a look for the part's own keys in the output. Only
turns of those roles whose content is text alone (or text and media the family writes as text, below) are
changed, so a template that iterates parts renders exactly as before.

Some templates take content only as a string for every role: Phi-4-multimodal's, as Microsoft publishes it, writes
``'<|' + role + '|>' + message['content']``, so parts fail in it (a string plus a list). A role whose probe fails
with parts but renders with the same text as a string is such a role too. Its turns with media get a string when the
family says how its processor reads a medium written as text (``Family.media_placeholders``, e.g. ``<|image|>``):
each media part becomes that placeholder at its place in the turn, numbered per kind across the conversation where
the placeholder asks for it (``{index}``), so the processor expands it as it would the template's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

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
        except Exception:  # a template that refuses parts here: does it take the same turns as strings?
            if _renders_strings(render, probe(parts)):
                printed.add(role)
            continue
        if f"'text': '{_MARKER}'" in text or f'"text": "{_MARKER}"' in text:
            printed.add(role)
    return frozenset(printed)


def _renders_strings(render: Callable[[list[HFMessage]], str], probe: list[HFMessage]) -> bool:
    """Whether ``probe`` with every turn's text as a string renders, the probed text in it (a string-only template).

    Whatever the template raises for strings too (a role it refuses, an order it requires) leaves the role as it is.
    """
    try:
        text = render(with_string_content(probe, frozenset(m["role"] for m in probe)))
    except Exception:
        return False
    return _MARKER in text


def with_string_content(
    messages: Iterable[HFMessage], roles: frozenset[str], placeholders: Mapping[str, str] | None = None
) -> list[HFMessage]:
    """``messages`` with the content of turns of ``roles`` joined into a string (other turns untouched).

    A turn is joined when each of its parts is text, or a medium ``placeholders`` names (kind -> its text, ``{index}``
    replaced by the item's 1-based number among that kind's media in ``messages``, counted over every turn); a turn
    with any other part keeps its parts, for the template to render or refuse.
    """
    placeholders = placeholders or {}
    if not roles:
        return list(messages)
    seen: dict[str, int] = {}
    converted = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            converted.append(message)
            continue
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _MEDIA_KINDS:
                seen[kind] = seen.get(kind, 0) + 1
                pieces.append(_placeholder(placeholders.get(kind), seen[kind]))
            else:
                pieces.append(part.get("text", "") if _is_text(part) else None)
        if message.get("role") in roles and None not in pieces:
            message = {**message, "content": "".join(p for p in pieces if p is not None)}
        converted.append(message)
    return converted


#: The media part types ``conversation.to_hf_messages`` writes.
_MEDIA_KINDS = frozenset({"image", "video", "audio"})


def _placeholder(template: str | None, index: int) -> str | None:
    return None if template is None else template.replace("{index}", str(index))


def _is_text(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") == "text"
