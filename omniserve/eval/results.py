"""Read what EvalScope wrote for one suite and turn it into a ``SuiteResult``.

A finished run is read through EvalScope's own ``Report`` (its primary metric, subsets and
completion counts). A run that was stopped (the server died) or crashed has no report, but
EvalScope writes one review line per finished item as it goes; those lines give the partial
score. Reviews are also where per-item metric failures are recorded (``metric_errors``): EvalScope
puts 0.0 in the value and logs an error, and omniserve turns that into a reported error instead.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from omniserve.eval.datasets import StagedSuite
from omniserve.eval.report import SampleCounts, SubsetScore, SuiteResult

#: The per-item value EvalScope records as the main score, by suite scoring.
SAMPLE_METRIC = {"accuracy": "accuracy", "exact": "exact_match", "rouge": "Rouge-L-R"}
_ITEM_FAILED = re.compile(r"Processing item in subset=.*? failed: (.*)")


def review_lines(work_dir: Path, staged: StagedSuite) -> dict[str, list[dict[str, Any]]]:
    """Review records per subset written so far (a line being written at this instant is skipped)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for subset in staged.totals:
        records = []
        for file in Path(work_dir).glob(f"reviews/**/{staged.benchmark}_{subset}.jsonl"):
            for line in file.read_text("utf-8", errors="replace").splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        found[subset] = records
    return found


def answered(work_dir: Path, staged: StagedSuite) -> int:
    """Items the model has answered so far (EvalScope writes a prediction line per item as it completes)."""
    count = 0
    for subset in staged.totals:
        for file in Path(work_dir).glob(f"predictions/**/{staged.benchmark}_{subset}.jsonl"):
            count += sum(1 for line in file.read_text("utf-8", errors="replace").splitlines() if line.strip())
    return count


def running_score(records: dict[str, list[dict[str, Any]]], scoring: str) -> tuple[int, float | None]:
    """Items reviewed so far and their mean main score (None before the first)."""
    values = [_main_value(r, SAMPLE_METRIC.get(scoring, scoring)) for rs in records.values() for r in rs]
    scored = [v for v in values if v is not None]
    return len(values), (sum(scored) / len(scored) if scored else None)


def collect(
    staged: StagedSuite, work_dir: Path, *, exit_code: int | None, stopped: str | None, seconds: float, log_tail: str
) -> SuiteResult:
    """The suite's result from EvalScope's report when the run finished, else from its review lines."""
    scoring = staged.suite.scoring
    base = SuiteResult.of(
        staged,
        metric=SAMPLE_METRIC.get(scoring, scoring),  # standard benchmarks: EvalScope's metric name
        status="complete",
        seconds=round(seconds, 2),
        evalscope_dir=str(work_dir),
    )
    records = review_lines(work_dir, staged)
    metric_errors = _metric_errors(records)
    report_file = next(Path(work_dir).glob(f"reports/**/{staged.benchmark}.json"), None)
    if exit_code == 0 and report_file is not None:
        result = _from_report(base, report_file, staged)
    else:
        result = _from_reviews(base, records, staged)
        if stopped is None:
            result.errors.insert(0, f"EvalScope exited with code {exit_code}: {log_tail.strip()[-2000:]}")
        result.status = "incomplete" if result.samples.scored else "error"
    if stopped is not None:
        result.errors.insert(0, f"run stopped after {result.samples.scored} of {staged.total} items: {stopped}")
        result.status = "incomplete" if result.score is not None else "error"
    if result.samples.errored and result.status == "complete":
        result.status = "incomplete"
    if result.samples.errored:
        result.errors.append(
            f"{result.samples.errored} of {result.samples.requested} items failed: {_item_failures(work_dir)}"
        )
    for metric, (count, message) in metric_errors.items():
        result.errors.append(f"metric {metric} could not be computed for {count} items: {message}")
        if metric.lower() in result.metric.lower():  # the primary metric itself failed: no score
            result.score = None
    if result.score is None and result.status == "complete":
        result.status = "error"
    return result


def _from_report(base: SuiteResult, report_file: Path, staged: StagedSuite) -> SuiteResult:
    from evalscope.report import Report

    report = Report.from_json(str(report_file))
    result = base.model_copy(deep=True)
    metric = report.primary_metric
    if metric is None:
        result.errors.append(
            f"EvalScope could not compute the primary metric: {report.primary_metric_unavailable_reason}"
        )
    else:
        result.metric = metric.name
        result.score = report.score
        for category in metric.categories:
            for subset in category.subsets:
                if not subset.is_aggregate:
                    result.subsets[subset.name] = SubsetScore(score=subset.score, samples=subset.num)
    summary = report.execution_summary
    if summary is not None:
        result.samples = SampleCounts(requested=summary.requested, scored=summary.succeeded, errored=summary.errored)
    else:
        result.samples = SampleCounts(requested=staged.total, scored=report.num)
    return result


def _from_reviews(base: SuiteResult, records: dict[str, list[dict[str, Any]]], staged: StagedSuite) -> SuiteResult:
    result = base.model_copy(deep=True)
    key = SAMPLE_METRIC.get(staged.suite.scoring, staged.suite.scoring)
    total_values: list[float] = []
    for subset, rows in records.items():
        values = [v for v in (_main_value(r, key) for r in rows) if v is not None]
        if rows:
            result.subsets[subset] = SubsetScore(score=sum(values) / len(values) if values else None, samples=len(rows))
        total_values += values
    result.score = sum(total_values) / len(total_values) if total_values else None
    result.samples = SampleCounts(requested=staged.total, scored=sum(len(r) for r in records.values()))
    return result


def _main_value(record: dict[str, Any], key: str) -> float | None:
    score = (record.get("sample_score") or {}).get("score") or {}
    value = (score.get("value") or {}).get(score.get("main_score_name") or key)
    return float(value) if isinstance(value, int | float) else None


def _metric_errors(records: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[int, str]]:
    failures: dict[str, list[str]] = defaultdict(list)
    for rows in records.values():
        for record in rows:
            metadata = ((record.get("sample_score") or {}).get("score") or {}).get("metadata") or {}
            for metric, message in (metadata.get("metric_errors") or {}).items():
                failures[metric].append(str(message))
    return {metric: (len(messages), messages[0].splitlines()[0][:300]) for metric, messages in failures.items()}


def _item_failures(work_dir: Path, keep: int = 3) -> str:
    messages: list[str] = []
    for log in Path(work_dir).glob("logs/*.log"):
        for line in log.read_text("utf-8", errors="replace").splitlines():
            match = _ITEM_FAILED.search(line)
            if match and match.group(1) not in messages:
                messages.append(match.group(1)[:300])
    return "; ".join(messages[:keep]) or "see the EvalScope log"
