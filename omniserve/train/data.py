"""Read training conversations from JSONL: one OpenAI-style ``{"messages": [...]}`` object per line.

Lines are validated with the server's own request types (``protocol.ChatMessage``), so anything a
client may send can be trained on and nothing the server would refuse slips in. Every problem is
reported as ``FILE:LINE: what is wrong``; other top-level keys (``id``, ``task``, ``answer``) are
kept as metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omniserve.protocol import AssistantMessage, ChatMessage
from omniserve.validation import describe_validation_error


class DataError(ValueError):
    """A problem with a training file, located by file and line (line 0: the file as a whole)."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass(frozen=True)
class Conversation:
    """One validated line: the messages (server types), where it came from, and its other fields."""

    path: Path
    line: int
    messages: list[ChatMessage]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if isinstance(m, AssistantMessage)]


@cache
def _messages_adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(list[ChatMessage])


def read_conversations(path: Path, *, require_assistant: bool = True) -> list[Conversation]:
    """Parse and validate every non-blank line of ``path``; the first bad line raises ``DataError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, 0, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, 0, f"cannot read the file: {exc}") from None
    conversations = [
        parse_line(path, number, line, require_assistant=require_assistant)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not conversations:
        raise DataError(path, 0, "the file holds no conversations")
    return conversations


def parse_line(path: Path, number: int, line: str, *, require_assistant: bool = True) -> Conversation:
    from pydantic import ValidationError

    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(path, number, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(path, number, 'expected a JSON object with a "messages" list')
    try:
        messages = _messages_adapter().validate_python(record["messages"])
    except ValidationError as exc:
        problem = describe_validation_error(exc, root="messages")
        raise DataError(path, number, f"invalid messages: {problem.message}") from None
    if not messages:
        raise DataError(path, number, "messages is empty")
    conversation = Conversation(path, number, messages, {k: v for k, v in record.items() if k != "messages"})
    if require_assistant and not conversation.assistant_indices():
        raise DataError(path, number, "the conversation has no assistant turn to learn from")
    return conversation
