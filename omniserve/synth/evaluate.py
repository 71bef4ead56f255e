"""Score a served model on a synthetic test split, the way a user would query it.

Each test conversation is sent without its final answer to a running OpenAI-compatible server
with the official ``openai`` client at temperature 0, its media inlined as base64 data URLs (as
a remote client must send them), and the reply is compared with the known answer (exact match
after trimming whitespace and case).
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


@dataclass
class TaskScore:
    correct: int = 0
    total: int = 0
    wrong: list[tuple[str, str, str]] = field(default_factory=list)  # (id, expected, got)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


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
    return [{**m, "content": _inline(m["content"], root)} for m in messages]


def score_server(
    client: Any, model: str, test_file: Path, *, per_task: int | None = None, concurrency: int = 8
) -> dict[str, TaskScore]:
    """Ask every test question through ``client`` (an ``openai.OpenAI``); return the score per task."""
    test_file = Path(test_file)
    items = load_test_items(test_file, per_task=per_task)

    def ask(record: dict[str, Any]) -> str:
        response = client.chat.completions.create(
            model=model,
            messages=request_messages(record, test_file.parent),
            temperature=0,
            max_tokens=16,
        )
        return response.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(ask, items))
    scores: dict[str, TaskScore] = defaultdict(TaskScore)
    for record, reply in zip(items, replies, strict=True):
        score = scores[record["task"]]
        score.total += 1
        if reply.strip().lower() == str(record["answer"]).strip().lower():
            score.correct += 1
        else:
            score.wrong.append((record.get("id", "?"), record["answer"], reply))
    return dict(scores)


def _inline(content: Any, root: Path) -> Any:
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
