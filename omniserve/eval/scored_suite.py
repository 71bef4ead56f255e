"""The loop of the suites omniserve sends and scores itself (``tools``, ``asr``), where EvalScope cannot.

Each such suite says only how one item is asked and how a reply counts; this module does the rest the same way
for all of them: every staged item sent through the official ``openai`` client, ``concurrency`` at a time; a
request that fails (an HTTP error, a timeout) counted as an errored item, not a wrong one, which makes the suite
``incomplete`` (``error`` when nothing was scored); progress after each reply; the result shaped as every suite's,
with the wrong answers written to ``wrong.txt`` beside the run's data (the report's errors are for failures).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from omniserve.eval.datasets import StagedSuite
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import SampleCounts, SubsetScore, SuiteResult
from omniserve.eval.target import Target

#: Failed requests quoted in the suite's errors; the count says how many there were in all.
ERRORS_SHOWN = 5

#: One staged item: its subset and its record (the JSONL line).
Item = tuple[str, dict[str, Any]]


@dataclass
class Scored:
    """A suite's scores once every reply is in, in the report's terms."""

    score: float | None
    subsets: dict[str, SubsetScore]
    scored: int  # items with a reply (right or wrong)
    wrong: list[str]  # one line per wrong answer, for wrong.txt


def ask_and_score(
    staged: StagedSuite,
    target: Target,
    *,
    metric: str,
    records: Callable[[StagedSuite, str], list[dict[str, Any]]],
    request: Callable[[Any, dict[str, Any]], Any],
    tally: Callable[[str, dict[str, Any], Any], None],
    running_score: Callable[[], float | None],
    summary: Callable[[], Scored],
    concurrency: int,
    request_timeout: float,
    progress: SuiteProgress,
) -> SuiteResult:
    """Ask every item (``records(staged, subset)`` for each subset, all read before the first request) with
    ``request(client, record)`` (an ``openai.OpenAIError`` it raises is a failed item), count each reply with
    ``tally(subset, record, reply)``, and return the suite's result from ``summary()``. ``running_score()`` is the
    score so far, shown in the progress bar."""
    import openai

    suite = staged.suite
    started = time.monotonic()
    items = [(subset, record) for subset in staged.totals for record in records(staged, subset)]
    client = openai.OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=0, timeout=request_timeout)
    task = progress.add(suite.name, len(items))
    failures: list[str] = []

    def one(item: Item) -> Any:
        try:
            return request(client, item[1])
        except openai.OpenAIError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for done, ((subset, record), reply) in enumerate(zip(items, pool.map(one, items), strict=True), start=1):
            if isinstance(reply, Exception):
                failures.append(f"{record.get('id', '?')}: {type(reply).__name__}: {reply}")
            else:
                tally(subset, record, reply)
            progress.update(task, done, running_score())
    result = _result(staged, metric, summary(), failures, time.monotonic() - started)
    progress.finish(task, result.status, result.score)
    return result


def _result(staged: StagedSuite, metric: str, scored: Scored, failures: list[str], seconds: float) -> SuiteResult:
    errors = []
    if failures:
        errors.append(f"{len(failures)} of {staged.total} items failed: " + "; ".join(failures[:ERRORS_SHOWN]))
    status = "complete" if not failures else ("incomplete" if scored.scored else "error")
    result = SuiteResult.of(
        staged,
        metric=metric,
        status=status,
        score=scored.score,
        subsets=scored.subsets,
        samples=SampleCounts(requested=staged.total, scored=scored.scored, errored=len(failures)),
        errors=errors,
        seconds=round(seconds, 2),
    )
    if scored.wrong:
        (staged.local_path / "wrong.txt").write_text("\n".join(scored.wrong) + "\n", "utf-8")
    return result
