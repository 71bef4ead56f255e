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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omniserve.eval.datasets import StagedSuite
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import SampleCounts, SubsetScore, SuiteResult
from omniserve.eval.target import Target

METRIC = "tool_call_match"
_ERRORS_SHOWN = 5


def run_tools_suite(
    staged: StagedSuite, target: Target, *, concurrency: int, request_timeout: float, progress: SuiteProgress
) -> SuiteResult:
    """Ask every staged item, score the replies, and return the suite's result (never raises on a bad reply)."""
    import openai

    from omniserve.synth.evaluate import TaskScore, ask, inline_content, score_reply

    suite = staged.suite
    started = time.monotonic()
    client = openai.OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=0, timeout=request_timeout)
    items = [(subset, record) for subset in staged.totals for record in _records(staged, subset)]
    task = progress.add(suite.name, len(items))
    scores: dict[str, TaskScore] = {subset: TaskScore() for subset in staged.totals}
    failures: list[str] = []
    done = 0

    def one(item: tuple[str, dict[str, Any]]) -> Any:
        _, record = item
        messages = [{**m, "content": inline_content(m["content"], Path("/"))} for m in record["messages"]]
        try:
            return ask(client, target.model, record, messages, suite.generation.max_tokens)
        except openai.OpenAIError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for (subset, record), reply in zip(items, pool.map(one, items), strict=True):
            done += 1
            if isinstance(reply, Exception):
                failures.append(f"{record.get('id', '?')}: {type(reply).__name__}: {reply}")
            else:
                scores[subset].add(record.get("id", "?"), record["answer"], reply, score_reply(record, reply))
            progress.update(task, done, _overall(scores))
    result = _result(staged, scores, failures, time.monotonic() - started)
    progress.finish(task, result.status, result.score)
    return result


def _records(staged: StagedSuite, subset: str) -> list[dict[str, Any]]:
    file = staged.local_path / f"{subset}_{staged.suite.split}.jsonl"
    return [json.loads(line) for line in file.read_text("utf-8").splitlines() if line.strip()]


def _overall(scores: dict[str, Any]) -> float | None:
    total = sum(s.total for s in scores.values())
    return sum(s.correct for s in scores.values()) / total if total else None


def _result(staged: StagedSuite, scores: dict[str, Any], failures: list[str], seconds: float) -> SuiteResult:
    suite = staged.suite
    subsets: dict[str, SubsetScore] = {}
    for name, score in scores.items():
        subsets[name] = SubsetScore(score=score.accuracy if score.total else None, samples=score.total)
        for check, passed in score.checks.items():
            subsets[f"{name}.{check}"] = SubsetScore(score=passed / score.total, samples=score.total)
    scored = sum(s.total for s in scores.values())
    errors = []
    if failures:
        errors.append(f"{len(failures)} of {staged.total} items failed: " + "; ".join(failures[:_ERRORS_SHOWN]))
    wrong = [f"{ident}: expected {expected}, got {got}" for s in scores.values() for ident, expected, got in s.wrong]
    status = "complete" if not failures else ("incomplete" if scored else "error")
    result = SuiteResult(
        suite=suite.name,
        description=suite.description,
        format=suite.format,
        scoring=suite.scoring,
        benchmark=staged.benchmark,
        metric=METRIC,
        status=status,
        score=_overall(scores),
        subsets=subsets,
        samples=SampleCounts(requested=staged.total, scored=scored, errored=len(failures)),
        errors=errors,
        seconds=round(seconds, 2),
    )
    if wrong:  # the report's errors list is for failures; wrong answers go beside the run's data
        (staged.local_path / "wrong.txt").write_text("\n".join(wrong) + "\n", "utf-8")
    return result
