"""Read training conversations from JSONL: one OpenAI-style ``{"messages": [...]}`` object per line.

Lines are validated with the server's own request types (``protocol.ChatMessage``), so anything a
client may send can be trained on and nothing the server would refuse slips in. A line may carry
``"tools"`` (OpenAI function tools, ``protocol.FunctionTool``): the template renders them into the
prompt as it does for a request with those tools; assistant ``tool_calls`` and ``role: "tool"``
results may then appear in the history, each result answering an earlier call. A
``"response_format"`` (``protocol.ResponseFormat``) is checked and kept as metadata: it constrains
decoding when served, it is not part of the prompt. Every problem is reported as
``FILE:LINE: what is wrong``; other top-level keys (``id``, ``task``, ``answer``) are kept as metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from omniserve.protocol import (
    MAX_TOOLS,
    AssistantMessage,
    ChatMessage,
    FunctionTool,
    ResponseFormat,
    ToolMessage,
)
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
    #: The line's function tools as the server hands a request's to the template (``RenderOptions.tools``).
    tools: tuple[dict[str, Any], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def media_kinds(self) -> frozenset[str]:
        """The media kinds ("image", "video", "audio") the messages hold, as the server sees a request's."""
        from omniserve.templates.conversation import to_hf_messages

        return frozenset(source.kind for source in to_hf_messages(self.messages)[1])

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if isinstance(m, AssistantMessage)]


@cache
def _messages_adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(list[ChatMessage])


@cache
def _tools_adapter() -> Any:
    from pydantic import Field, TypeAdapter

    return TypeAdapter(Annotated[list[FunctionTool], Field(min_length=1, max_length=MAX_TOOLS)])


@cache
def _response_format_adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(ResponseFormat)


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
    tools = _tools(path, number, record)
    _check_tool_results(path, number, messages)
    if "response_format" in record:
        try:
            _response_format_adapter().validate_python(record["response_format"])
        except ValidationError as exc:
            problem = describe_validation_error(exc, root="response_format")
            raise DataError(path, number, f"invalid response_format: {problem.message}") from None
    meta = {k: v for k, v in record.items() if k not in ("messages", "tools")}
    conversation = Conversation(path, number, messages, meta, tools)
    if require_assistant and not conversation.assistant_indices():
        raise DataError(path, number, "the conversation has no assistant turn to learn from")
    return conversation


def _tools(path: Path, number: int, record: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The line's tools, validated as a request's and dumped as the server gives them to the template."""
    from pydantic import ValidationError

    if record.get("tools") is None:
        return ()
    try:
        tools: list[FunctionTool] = _tools_adapter().validate_python(record["tools"])
    except ValidationError as exc:
        problem = describe_validation_error(exc, root="tools")
        raise DataError(path, number, f"invalid tools: {problem.message}") from None
    names = [tool.function.name for tool in tools]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise DataError(path, number, f"tool names must be unique; '{duplicate}' appears twice")
    return tuple(tool.model_dump(exclude_none=True) for tool in tools)


def _check_tool_results(path: Path, number: int, messages: list[ChatMessage]) -> None:
    """Every ``tool`` message answers a call an earlier assistant turn made, as the server requires."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        if isinstance(message, AssistantMessage):
            calls.update(call.id for call in message.tool_calls or ())
        elif isinstance(message, ToolMessage) and message.tool_call_id not in calls:
            raise DataError(
                path,
                number,
                f"messages[{i}] answers tool call '{message.tool_call_id}', which no earlier assistant message made",
            )
