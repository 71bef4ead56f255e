"""Self-contained HTML pages for ``eval compare`` and ``bench``: the tables and the chart in one file.

After a run, people would rather look at a comparison than read JSON, and the place they look is often
not the machine that ran it (a file attached to a ticket, a CI artefact). So the page needs nothing
else: the chart's PNG is embedded as a ``data:`` URL, the style is inline, there is no script, and a
Content-Security-Policy in the page itself refuses anything a future edit might try to fetch. Every
value from a report (model names, labels, suite names) is escaped: they come from other people's files.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omniserve.atomic_files import write_text_atomic

if TYPE_CHECKING:  # the report types import this module to write themselves
    from omniserve.eval.bench import BenchReport, Stats
    from omniserve.eval.compare import Comparison

#: Nothing but the page's own inline style and embedded images, whatever a report contains.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

#: Retention at or above this is "kept" (green); below ``_RETENTION_LOST`` it is "lost" (red).
_RETENTION_KEPT = 0.99
_RETENTION_LOST = 0.95

_STYLE = """
:root { color-scheme: light dark; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
body { max-width: 90rem; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.35rem; } h2 { font-size: 1.05rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #8884; padding: 0.3rem 0.6rem; text-align: right; vertical-align: top; }
td { white-space: nowrap; } .scroll { overflow-x: auto; }
th:first-child, td:first-child { text-align: left; }
th { background: #8881; }
td.kept { background: #2e7d3226; } td.worse { background: #f9a82530; } td.lost { background: #c6282830; }
td.missing { color: #888; }
img { max-width: 100%; height: auto; border: 1px solid #8884; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; } dt { color: #888; } dd { margin: 0; }
footer { margin-top: 2rem; color: #888; font-size: 0.85rem; }
"""

#: A table cell: its text, or its text and a CSS class.
Cell = str | tuple[str, str]


def page(title: str, sections: Iterable[str]) -> str:
    """A whole HTML document around already-escaped ``sections``."""
    return (
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CONTENT_SECURITY_POLICY}\">\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """An HTML table; every header and cell text is escaped."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            text, css = (cell, "") if isinstance(cell, str) else cell
            attribute = f" class='{html.escape(css)}'" if css else ""
            cells.append(f"<td{attribute}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    rows_html = "\n".join(body)
    return (
        f"<div class='scroll'><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows_html}\n</tbody>\n</table></div>"
    )


def embedded_png(path: Path, alt: str) -> str:
    """The chart inside the page (a ``data:`` URL), or a note when it was not drawn."""
    if not Path(path).is_file():
        return f"<p>(no chart: {html.escape(Path(path).name)} was not written)</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt, quote=True)}'>"


def definitions(items: Iterable[tuple[str, object]]) -> str:
    """A ``<dl>`` of name/value pairs (``None`` values left out)."""
    rows = [
        f"<dt>{html.escape(name)}</dt><dd>{html.escape(str(value))}</dd>" for name, value in items if value is not None
    ]
    return "<dl>" + "".join(rows) + "</dl>"


# ---------------------------------------------------------------- eval compare


def compare_html(comparison: Comparison) -> str:
    """Scores per suite and run, retention against the first run coloured, and the grouped bar chart."""
    header = ["suite", *comparison.labels]
    rows = []
    for suite in comparison.suites:
        row: list[Cell] = [suite]
        for index, label in enumerate(comparison.labels):
            if suite not in comparison.scores[label]:
                row.append(("not in this run", "missing"))
                continue
            score = comparison.scores[label][suite]
            if score is None:
                row.append(("error", "lost"))
                continue
            text = f"{score * 100:.1f}"
            if index == 0:
                row.append(text)
                continue
            kept = comparison.retention[label].get(suite)
            if kept is None:
                row.append((f"{text} (retention n/a)", "missing"))
            else:
                row.append((f"{text} ({kept * 100:.0f}%)", _retention_class(kept)))
        rows.append(row)
    baseline = html.escape(comparison.labels[0]) if comparison.labels else ""
    sections = [
        f"<p>Scores in points (0-100); in brackets, the retention against the first run, <b>{baseline}</b> "
        f"(score / its score). Green: at least {_RETENTION_KEPT:.0%} kept; red: under {_RETENTION_LOST:.0%}. "
        "Retention is n/a where the first run scored 0 or has no score.</p>",
        table(header, rows),
        "<h2>Chart</h2>",
        embedded_png(comparison.plot, "scores per suite, one bar per run"),
        "<footer>Written by omniserve eval compare, beside compare.json, compare.md and compare.png.</footer>",
    ]
    return page("omniserve eval compare", sections)


def _retention_class(kept: float) -> str:
    if kept >= _RETENTION_KEPT:
        return "kept"
    return "worse" if kept >= _RETENTION_LOST else "lost"


def write_compare_html(comparison: Comparison, path: Path) -> Path:
    write_text_atomic(path, compare_html(comparison))
    return path


# ---------------------------------------------------------------- bench


def bench_html(report: BenchReport, chart: Path) -> str:
    """Throughput and latency per concurrency level (or request rate, open loop), the run's settings, the chart."""
    open_loop = any(level.rate is not None for level in report.levels)
    header = [
        "rate (req/s)" if open_loop else "concurrency",
        "ok / failed",
        "seconds",
        "req/s",
        "output tok/s",
        "total tok/s",
        "avg in / out tokens",
        "TTFT ms mean / p50 / p90 / p99",
        "TPOT ms mean / p50 / p90 / p99",
        "ITL ms mean / p50 / p90 / p99",
        "latency s mean / p50 / p90 / p99",
    ]
    rows = []
    for level in report.levels:
        failed = "lost" if level.failed or not level.succeeded else ""
        rows.append(
            [
                f"{level.rate:g}" if open_loop and level.rate is not None else str(level.concurrency),
                (f"{level.succeeded} / {level.failed}", failed),
                f"{level.seconds:.2f}",
                f"{level.requests_per_s:.2f}",
                f"{level.output_tokens_per_s:.1f}",
                f"{level.total_tokens_per_s:.1f}",
                f"{_number(level.avg_input_tokens)} / {_number(level.avg_output_tokens)}",
                _four(level.ttft_ms, 1),
                _four(level.tpot_ms, 1),
                _four(level.itl_ms, 1),
                _four(level.latency_s, 3),
            ]
        )
    target = report.target
    settings = definitions(
        [
            ("model", target.get("model")),
            ("target", target.get("mode")),
            ("server", target.get("url") or target.get("model_path")),
            ("engine", target.get("engine")),
            ("created", report.created),
            *((name, value) for name, value in sorted(report.options.items()) if value not in (None, [], {})),
        ]
    )
    versions = ", ".join(f"{name} {version}" for name, version in report.versions.items() if version)
    sections = [
        f"<p>{html.escape(report.markdown().splitlines()[0])}</p>",
        table(header, rows),
        "<h2>Chart</h2>",
        embedded_png(chart, f"throughput and latency against {'request rate' if open_loop else 'concurrency'}"),
        "<h2>Settings</h2>",
        settings,
        f"<footer>Measured with EvalScope's perf tool ({html.escape(versions)}); written by omniserve bench, beside "
        "bench.json, bench.md and bench.png.</footer>",
    ]
    return page(f"omniserve bench: {target.get('model')}", sections)


def write_bench_html(report: BenchReport, chart: Path, path: Path) -> Path:
    write_text_atomic(path, bench_html(report, chart))
    return path


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _four(stats: Stats, digits: int) -> str:
    values = (stats.mean, stats.p50, stats.p90, stats.p99)
    return " / ".join("-" if value is None else f"{value:.{digits}f}" for value in values)
