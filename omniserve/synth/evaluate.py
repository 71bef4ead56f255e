"""Score a served model on a synthetic test split, the way a user would query it.

Each test conversation is sent without its final answer to a running OpenAI-compatible server
with the official ``openai`` client at temperature 0, its media inlined as base64 data URLs (as
a remote client must send them), and the reply is compared with the known answer (exact match
after trimming whitespace and case).

Tool and JSON tasks are sent as a client sends them: a tool task with the line's ``tools``
(``tool_choice`` "auto": the model decides to call), a JSON task with its ``response_format``.
``score_reply`` checks a tool reply for the function's name, its arguments (exact, as parsed JSON)
and their validity against the function's parameter schema; a JSON reply for validity against the
schema and the exact value. An item is correct when every check holds.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MIME = {"png": "image/png", "jpg": "image/jpeg", "mp4": "video/mp4", "wav": "audio/wav"}
_URL_PARTS = ("image_url", "video_url", "audio_url")


#: The checks of each kind of reply, in report order (``exact`` for plain answers).
TOOL_CHECKS = ("name", "arguments", "schema")
JSON_CHECKS = ("schema", "value")


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0
    wrong: list[tuple[str, str, str]] = field(default_factory=list)  # (id, expected, got)
    checks: dict[str, int] = field(default_factory=dict)  # check name -> items that passed it

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, ident: str, expected: str, reply: Reply, passed: dict[str, bool]) -> None:
        """Count one item: correct when every check passed."""
        self.total += 1
        for name, ok in passed.items():
            self.checks[name] = self.checks.get(name, 0) + int(ok)
        if all(passed.values()):
            self.correct += 1
        else:
            self.wrong.append((ident, expected, reply.describe()))


@dataclass(frozen=True)
class Reply:
    """What the server answered: the message's text and its tool calls as ``(name, arguments JSON)``."""

    content: str
    tool_calls: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, message: Any) -> Reply:
        calls = tuple((c.function.name, c.function.arguments) for c in message.tool_calls or ())
        return cls(message.content or "", calls)

    def describe(self) -> str:
        calls = " ".join(f"{name}({arguments})" for name, arguments in self.tool_calls)
        return " ".join(part for part in (self.content, calls) if part) or "(empty)"


def request_options(record: dict[str, Any]) -> dict[str, Any]:
    """The request fields a line asks for beside its messages: its tools or its response format."""
    if record.get("tools"):
        return {"tools": record["tools"], "tool_choice": "auto"}
    if record.get("response_format"):
        return {"response_format": record["response_format"]}
    return {}


def score_reply(record: dict[str, Any], reply: Reply) -> dict[str, bool]:
    """The checks of one reply against its line (see the module docstring)."""
    if record.get("tools"):
        return _tool_checks(record, reply)
    if record.get("response_format"):
        return _json_checks(record, reply)
    return {"exact": reply.content.strip().lower() == str(record["answer"]).strip().lower()}


def _tool_checks(record: dict[str, Any], reply: Reply) -> dict[str, bool]:
    expected = json.loads(record["answer"])
    if len(reply.tool_calls) != 1:
        return dict.fromkeys(TOOL_CHECKS, False)
    name, arguments = reply.tool_calls[0]
    parsed = _json(arguments)
    tool = next((t for t in record["tools"] if t["function"]["name"] == name), None)
    schema = (tool or {}).get("function", {}).get("parameters") or {"type": "object"}
    return {
        "name": name == expected["name"],
        "arguments": parsed == expected["arguments"],
        "schema": tool is not None and _valid(parsed, schema),
    }


def _json_checks(record: dict[str, Any], reply: Reply) -> dict[str, bool]:
    parsed = _json(reply.content)
    schema = record["response_format"].get("json_schema", {}).get("schema") or {"type": "object"}
    return {"schema": _valid(parsed, schema), "value": parsed == json.loads(record["answer"])}


_NOT_JSON = object()


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


def _valid(value: Any, schema: dict[str, Any]) -> bool:
    import jsonschema

    if value is _NOT_JSON:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def load_test_items(test_file: Path, *, per_task: int | None = None) -> list[dict[str, Any]]:
    """The test records (with ``task`` and ``answer``), at most ``per_task`` of each task, file order."""
    taken: dict[str, int] = defaultdict(int)
    items = []
    for line in Path(test_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if per_task is not None and taken[record["task"]] >= per_task:
            continue
        taken[record["task"]] += 1
        items.append(record)
    return items


def request_messages(record: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """The record's messages minus the final answer, with media files inlined as data URLs."""
    messages = record["messages"][:-1]
    return [{**m, "content": inline_content(m["content"], root)} for m in messages]


def ask(client: Any, model: str, record: dict[str, Any], messages: list[dict[str, Any]], max_tokens: int) -> Reply:
    """One item through the official client at temperature 0, with the line's tools or response format."""
    response = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, **request_options(record)
    )
    return Reply.of(response.choices[0].message)


def score_server(
    client: Any, model: str, test_file: Path, *, per_task: int | None = None, concurrency: int = 8
) -> dict[str, TaskScore]:
    """Ask every test question through ``client`` (an ``openai.OpenAI``); return the score per task."""
    test_file = Path(test_file)
    items = load_test_items(test_file, per_task=per_task)

    def one(record: dict[str, Any]) -> Reply:
        # a call or a JSON object is longer than a one-word answer
        max_tokens = 64 if request_options(record) else 16
        return ask(client, model, record, request_messages(record, test_file.parent), max_tokens)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(one, items))
    scores: dict[str, TaskScore] = defaultdict(TaskScore)
    for record, reply in zip(items, replies, strict=True):
        scores[record["task"]].add(record.get("id", "?"), record["answer"], reply, score_reply(record, reply))
    return dict(scores)


def inline_content(content: Any, root: Path) -> Any:
    """A message's content with local media files (relative to ``root``) inlined as a remote client sends them."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part["type"]
        if kind in _URL_PARTS and not part[kind]["url"].startswith("data:"):
            path = root / part[kind]["url"]
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            if kind == "audio_url":  # OpenAI's own audio part: bare base64 plus a format name
                part = {"type": "input_audio", "input_audio": {"data": data, "format": path.suffix[1:]}}
            else:
                part = {"type": kind, kind: {"url": f"data:{_MIME[path.suffix[1:]]};base64,{data}"}}
        parts.append(part)
    return parts
