"""``eval compare`` and ``bench`` write, beside their JSON and PNG, one HTML page with the tables and the
chart that opens in a browser with no server: nothing fetched (the chart is a ``data:`` URL), every value
from a report escaped, no console errors in headless Chromium.

The reports are written by the same functions the commands call (``compare_runs``, ``bench.write_reports``)
from report objects made here: a real EvalScope run is what tests/test_eval_run.py and
tests/test_eval_bench.py already do, and is not needed to check the page.
"""

from __future__ import annotations

import html.parser
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omniserve.eval.bench import BenchReport, LevelResult, Stats, write_reports
from omniserve.eval.compare import COMPARE_HTML, compare_runs
from omniserve.eval.html_report import CONTENT_SECURITY_POLICY
from omniserve.eval.report import RunReport, SuiteResult
from tests.browser import chromium, console, errors, screenshot

HOSTILE = "<script>alert(1)</script>"  # a model name is whatever someone typed


class _Links(html.parser.HTMLParser):
    """Every URL-valued attribute of a page and every element name, to check what it would load."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "srcset", "action", "data")]


def parsed(path: Path) -> _Links:
    links = _Links()
    links.feed(path.read_text("utf-8"))
    return links


def _suite(name: str, score: float | None) -> SuiteResult:
    return SuiteResult(
        suite=name,
        format="mcq",
        scoring="accuracy",
        benchmark="general_mcq",
        metric="acc",
        status="complete" if score is not None else "error",
        score=score,
        errors=[] if score is not None else ["the server went away"],
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def comparison_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compare")
    runs = {
        "bf16": {"text-mcq": 0.8, "image-mcq": 0.6, "omni-synth": 0.5},
        "awq": {"text-mcq": 0.4, "image-mcq": 0.6, "omni-synth": None},
        HOSTILE: {"text-mcq": 0.776, "image-mcq": 0.6},
    }
    paths = []
    for quant, scores in runs.items():
        report = RunReport(
            target={"mode": "url", "model": "tiny-omni", "quant": quant if quant != "bf16" else None},
            suites={name: _suite(name, score) for name, score in scores.items()},
        )
        report.write(folder / f"run-{len(paths)}")
        paths.append(folder / f"run-{len(paths)}")
    compare_runs(paths, folder / "out")
    return folder / "out" / COMPARE_HTML


@pytest.fixture(scope="module")
def bench_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench")

    def level(concurrency: int, scale: float) -> LevelResult:
        return LevelResult(
            concurrency=concurrency,
            requests=8,
            succeeded=8 if concurrency < 16 else 7,
            failed=0 if concurrency < 16 else 1,
            seconds=2.5,
            requests_per_s=3.2 * scale,
            output_tokens_per_s=200.0 * scale,
            total_tokens_per_s=260.0 * scale,
            avg_input_tokens=30.0,
            avg_output_tokens=64.0,
            ttft_ms=Stats(mean=40.0 * scale, p50=38.0 * scale, p90=55.0 * scale, p99=70.0 * scale),
            tpot_ms=Stats(mean=5.0, p50=4.8, p90=6.0, p99=7.5),
            itl_ms=Stats(),  # EvalScope had no data: shown as "-"
            latency_s=Stats(mean=0.4, p50=0.38, p90=0.5, p99=0.61),
        )

    report = BenchReport(
        target={"mode": "url", "model": HOSTILE, "url": "http://127.0.0.1:8000/v1"},
        options={"dataset": "synthetic", "media": "none", "stream": True, "max_tokens": 64, "ignore_eos": True},
        levels=[level(1, 1.0), level(4, 3.1), level(16, 6.0)],
        folder=folder,
    )
    write_reports(report)
    return folder / "bench.html"


def test_compare_writes_a_page_beside_its_json_and_png(comparison_page: Path) -> None:
    folder = comparison_page.parent
    assert {p.name for p in folder.iterdir()} >= {"compare.json", "compare.md", "compare.png", "compare.html"}
    text = comparison_page.read_text("utf-8")
    links = parsed(comparison_page)
    assert links.urls == [links.urls[0]] and links.urls[0].startswith("data:image/png;base64,")  # the chart only
    assert "script" not in links.tags  # the hostile label stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert f'content="{CONTENT_SECURITY_POLICY}"' in text
    # retention coloured: awq lost half of text-mcq (red), kept all of image-mcq (green), failed omni-synth
    assert "<td class='lost'>40.0 (50%)</td>" in text
    assert "<td class='kept'>60.0 (100%)</td>" in text
    assert "<td class='lost'>error</td>" in text
    assert "<td class='missing'>not in this run</td>" in text
    assert "<td class='worse'>77.6 (97%)</td>" in text


def test_bench_writes_a_page_beside_its_json_and_png(bench_page: Path) -> None:
    folder = bench_page.parent
    assert {p.name for p in folder.iterdir()} >= {"bench.json", "bench.md", "bench.png", "bench.html"}
    text = bench_page.read_text("utf-8")
    links = parsed(bench_page)
    assert len(links.urls) == 1 and links.urls[0].startswith("data:image/png;base64,")
    assert "script" not in links.tags and "&lt;script&gt;" in text
    # the server's address is shown as text, never a link
    assert "http://127.0.0.1:8000/v1" in text and "href" not in text
    assert "<td>16</td><td class='lost'>7 / 1</td>" in text
    assert "<td>40.0 / 38.0 / 55.0 / 70.0</td>" in text and "<td>- / - / - / -</td>" in text


@pytest.mark.parametrize("which", ["compare", "bench"])
def test_the_pages_open_from_disk_in_chromium_without_errors_or_requests(
    which: str, browser: Any, comparison_page: Path, bench_page: Path
) -> None:
    path = comparison_page if which == "compare" else bench_page
    console(browser)
    browser.get(path.as_uri())
    shown = browser.execute_script(
        "const img = document.querySelector('img');"
        "return {rows: document.querySelectorAll('tbody tr').length, chart: img.complete ? img.naturalWidth : 0,"
        " fetched: performance.getEntriesByType('resource').map((e) => e.name),"
        " scripts: document.scripts.length, title: document.title};"
    )
    assert shown["rows"] == 3 and shown["chart"] > 300  # the PNG decoded from its data: URL
    assert shown["fetched"] == [] and shown["scripts"] == 0
    assert HOSTILE in shown["title"] or which == "compare"
    screenshot(browser, f"{which}-report.png")
    messages = console(browser)
    assert errors(messages) == [], errors(messages)


def test_an_open_loop_bench_page_lists_request_rates(tmp_path: Path) -> None:
    """``bench --request-rate``: levels are rates, not concurrencies (EvalScope reports concurrency -1)."""
    level = LevelResult(
        concurrency=-1,
        rate=2.5,
        requests=4,
        succeeded=4,
        failed=0,
        seconds=1.6,
        requests_per_s=2.4,
        output_tokens_per_s=150.0,
        total_tokens_per_s=180.0,
        avg_input_tokens=30.0,
        avg_output_tokens=64.0,
        ttft_ms=Stats(mean=40.0, p50=38.0, p90=55.0, p99=70.0),
        tpot_ms=Stats(),
        itl_ms=Stats(),
        latency_s=Stats(),
    )
    report = BenchReport(target={"mode": "url", "model": "m"}, options={}, levels=[level], folder=tmp_path)
    write_reports(report)
    page = (tmp_path / "bench.html").read_text()
    assert "rate (req/s)" in page and "<td>2.5</td>" in page
    assert "<td>-1</td>" not in page
