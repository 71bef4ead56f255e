"""Run a ``tools`` suite (``tools-synth``): tool calls and JSON answers, scored by omniserve itself.

EvalScope's custom-data benchmarks send messages only, so these items go through the official
``openai`` client here, each as a client would send it: a tool item with its ``tools`` and
``tool_choice`` "auto" (the model has to decide to call), a JSON item with its ``response_format``.
Replies are scored by ``synth.evaluate.score_reply`` (the ``omniserve synth-eval`` scorer): function
name, arguments exact, arguments valid against the function's schema; JSON valid against the schema,
value exact. An item counts when every check holds; each check's pass rate is reported as a subset
``SUBSET.CHECK`` beside the subset's score. A request that fails (an HTTP error, a timeout) is an
errored item, not a wrong one, and makes the suite ``incomplete``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniserve.eval.datasets import StagedSuite
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import SubsetScore, SuiteResult
from omniserve.eval.scored_suite import Scored, ask_and_score
from omniserve.eval.target import Target

METRIC = "tool_call_match"


def run_tools_suite(
    staged: StagedSuite, target: Target, *, concurrency: int, request_timeout: float, progress: SuiteProgress
) -> SuiteResult:
    """Ask every staged item, score the replies, and return the suite's result (never raises on a bad reply)."""
    from omniserve.synth.evaluate import TaskScore, ask, inline_content, score_reply

    scores: dict[str, TaskScore] = {subset: TaskScore() for subset in staged.totals}

    def request(client: Any, record: dict[str, Any]) -> Any:
        messages = [{**m, "content": inline_content(m["content"], Path("/"))} for m in record["messages"]]
        return ask(client, target.model, record, messages, staged.suite.generation.max_tokens)

    def tally(subset: str, record: dict[str, Any], reply: Any) -> None:
        scores[subset].add(record.get("id", "?"), record["answer"], reply, score_reply(record, reply))

    return ask_and_score(
        staged,
        target,
        metric=METRIC,
        records=_records,
        request=request,
        tally=tally,
        running_score=lambda: _overall(scores),
        summary=lambda: _summary(scores),
        concurrency=concurrency,
        request_timeout=request_timeout,
        progress=progress,
    )


def _records(staged: StagedSuite, subset: str) -> list[dict[str, Any]]:
    file = staged.local_path / f"{subset}_{staged.suite.split}.jsonl"
    return [json.loads(line) for line in file.read_text("utf-8").splitlines() if line.strip()]


def _overall(scores: dict[str, Any]) -> float | None:
    total = sum(s.total for s in scores.values())
    return sum(s.correct for s in scores.values()) / total if total else None


def _summary(scores: dict[str, Any]) -> Scored:
    """Per subset: its accuracy and each check's pass rate (``SUBSET.CHECK``); wrong answers for wrong.txt."""
    subsets: dict[str, SubsetScore] = {}
    for name, score in scores.items():
        subsets[name] = SubsetScore(score=score.accuracy if score.total else None, samples=score.total)
        for check, passed in score.checks.items():
            subsets[f"{name}.{check}"] = SubsetScore(score=passed / score.total, samples=score.total)
    wrong = [f"{ident}: expected {expected}, got {got}" for s in scores.values() for ident, expected, got in s.wrong]
    return Scored(score=_overall(scores), subsets=subsets, scored=sum(s.total for s in scores.values()), wrong=wrong)
