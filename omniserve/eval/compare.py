"""``omniserve eval compare RUN...``: several runs side by side, retention against the first.

Retention is ``score / baseline score`` per suite (1.0 = nothing lost). It is undefined when the
baseline scored 0 or has no score, and is then reported as ``None`` rather than as a made-up
number. The plot is a grouped bar chart, one group per suite, one bar per run, with each bar's
retention written on it, so "bf16 vs awq vs gptq vs fp8" reads at a glance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omniserve.atomic_files import write_text_atomic, write_with
from omniserve.eval.errors import EvalError
from omniserve.eval.html_report import write_compare_html
from omniserve.eval.report import REPORT_JSON, RunReport
from omniserve.eval.worker import require_eval_extra

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"
COMPARE_HTML = "compare.html"


@dataclass(frozen=True)
class Comparison:
    labels: list[str]
    suites: list[str]
    scores: dict[str, dict[str, float | None]]  # label -> suite -> score
    retention: dict[str, dict[str, float | None]]  # label -> suite -> score / baseline
    plot: Path
    folder: Path

    def markdown(self) -> str:
        header = "| suite | " + " | ".join(self.labels) + " |"
        lines = [header, "|---" * (len(self.labels) + 1) + "|"]
        for suite in self.suites:
            cells = []
            for i, label in enumerate(self.labels):
                if suite not in self.scores[label]:
                    cells.append("-")  # not part of that run
                    continue
                score = self.scores[label][suite]
                cell = "error" if score is None else f"{score * 100:.1f}"
                if i > 0:
                    kept = self.retention[label].get(suite)
                    cell += " (n/a)" if kept is None else f" ({kept * 100:.0f}%)"
                cells.append(cell)
            lines.append(f"| {suite} | " + " | ".join(cells) + " |")
        return "Scores (retention vs the first run)\n\n" + "\n".join(lines) + "\n"


def compare_runs(runs: list[Path], output: Path) -> Comparison:
    """Read each run's report, write compare.json/.md/.png/.html into ``output``; the first run is the baseline."""
    if not runs:
        raise EvalError("give at least one run folder")
    require_eval_extra(evalscope=False, charts=True)
    reports = []
    for run in runs:
        file = Path(run) / REPORT_JSON if Path(run).is_dir() else Path(run)
        if not file.is_file():
            raise EvalError(f"{run} is not an evaluation run folder (no {REPORT_JSON})")
        reports.append(RunReport.load(file))
    labels = _unique([r.label() for r in reports], [Path(run).name for run in runs])
    suites = list(dict.fromkeys(s for r in reports for s in r.suites))
    scores = {label: {s: r.suites[s].score for s in r.suites} for label, r in zip(labels, reports, strict=True)}
    base = scores[labels[0]]
    # error rates (a standard benchmark's WER): keeping quality means the rate did not grow, so base / score
    lower = {s for r in reports for s, res in r.suites.items() if (res.standard or {}).get("lower_is_better")}
    retention = {
        label: {
            s: (
                (base[s] / v if s in lower else v / base[s])
                if v is not None and base.get(s) and (v or s not in lower)
                else None
            )
            for s, v in scores[label].items()
        }
        for label in labels
    }
    output.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(labels, suites, scores, retention, output / COMPARE_PNG, output)
    write_text_atomic(
        output / COMPARE_JSON,
        json.dumps(
            {"runs": [str(r) for r in runs], "labels": labels, "scores": scores, "retention": retention}, indent=2
        )
        + "\n",
    )
    write_text_atomic(output / COMPARE_MD, comparison.markdown())
    _plot(comparison)
    write_compare_html(comparison, output / COMPARE_HTML)  # the table and the chart, for a browser
    return comparison


def _unique(labels: list[str], fallbacks: list[str]) -> list[str]:
    """Labels as they are when distinct; otherwise suffixed with the run folder's name."""
    if len(set(labels)) == len(labels):
        return labels
    return [f"{label} [{folder}]" for label, folder in zip(labels, fallbacks, strict=True)]


def _plot(comparison: Comparison) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    suites, labels = comparison.suites, comparison.labels
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(suites) * max(1, len(labels)) / 2), 4.5))
    for i, label in enumerate(labels):
        xs = [k + (i - (len(labels) - 1) / 2) * width for k in range(len(suites))]
        values = [comparison.scores[label].get(s) for s in suites]
        heights = [0.0 if v is None else v * 100 for v in values]
        bars = ax.bar(xs, heights, width, label=label)
        for bar, value, suite in zip(bars, values, suites, strict=True):
            if suite not in comparison.scores[label]:
                continue
            kept = comparison.retention[label].get(suite)
            text = "error" if value is None else ("" if i == 0 else ("n/a" if kept is None else f"{kept * 100:.0f}%"))
            if text:
                ax.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(suites)), suites)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Scores per suite (labels: retention vs the first run)")
    # below the axes: inside, it covers the bars of scores near 100
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(labels), 3), frameon=False)
    fig.tight_layout()
    write_with(comparison.plot, lambda staging: fig.savefig(staging, dpi=110, format="png"))
    plt.close(fig)
