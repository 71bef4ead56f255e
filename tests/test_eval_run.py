"""``omniserve eval`` for real: EvalScope against the real omniserve server serving the trained demo model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from omniserve.eval.cli import bench_command, eval_app
from omniserve.eval.compare import compare_runs
from omniserve.eval.errors import EndpointError
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import RunReport
from omniserve.eval.runner import EvalOptions, run_evaluation
from tests.conftest import RunningServer, free_port, start_server

SUITES = ["text-mcq", "text-qa", "image-mcq", "omni-synth"]


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from omniserve.models.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="module")
def demo_server(demo_model: Path) -> Iterator[RunningServer]:
    server = start_server(demo_model, name="tiny-omni-demo", engine={"max_concurrency": 8, "max_queue": 64})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def url_progress() -> io.StringIO:
    """What the live progress display of ``url_run`` drew, as a terminal would receive it."""
    return io.StringIO()


@pytest.fixture(scope="module")
def url_run(
    demo_server: RunningServer, eval_cache: Path, url_progress: io.StringIO, tmp_path_factory: pytest.TempPathFactory
) -> RunReport:
    output = tmp_path_factory.mktemp("url-run")
    options = EvalOptions(suites=SUITES, url=f"{demo_server.base_url}/v1", limit=4, output=output, cache_dir=eval_cache)
    console = Console(file=url_progress, force_terminal=True, width=160)
    return run_evaluation(options, progress=SuiteProgress(console))


def test_progress_shows_each_suite_items_done_and_score(url_run: RunReport, url_progress: io.StringIO) -> None:
    text = url_progress.getvalue()
    for name, result in url_run.suites.items():
        total = result.samples.scored
        assert total > 0
        final = f"{total}/{total}"
        score = f"score {result.score * 100:.1f} (complete)"
        assert any(name in line and final in line and score in line for line in text.splitlines()), (name, text[-2000:])


def _cli() -> typer.Typer:
    """The commands mounted as ``omniserve/cli.py`` registers them."""
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.command("bench")(bench_command)
    return app


def test_url_run_scores_every_suite_and_writes_both_reports(url_run: RunReport) -> None:
    folder = Path(url_run.options["output"])
    saved = json.loads((folder / "report.json").read_text())
    assert saved["complete"] is True and list(saved["suites"]) == SUITES
    assert saved["target"] == {"mode": "url", "url": saved["target"]["url"], "model": "tiny-omni-demo"}
    assert saved["versions"]["evalscope"] == "1.14.1" and saved["versions"]["omniserve"]
    expected_subsets = {
        "text-mcq": {"arithmetic", "knowledge"},
        "text-qa": {"capitals", "numbers"},
        "image-mcq": {"colour", "shape"},
        "omni-synth": {"colour", "motion", "pitch", "larger", "mixed"},
    }
    for name, result in saved["suites"].items():
        assert result["status"] == "complete" and result["errors"] == []
        assert set(result["subsets"]) == expected_subsets[name]
        assert all(s["samples"] == 4 for s in result["subsets"].values())
        assert result["samples"] == {
            "requested": 4 * len(expected_subsets[name]),
            "scored": 4 * len(expected_subsets[name]),
            "errored": 0,
        }
        assert 0.0 <= result["score"] <= 1.0
    assert saved["suites"]["text-mcq"]["metric"].startswith("accuracy")
    assert saved["suites"]["text-qa"]["metric"].startswith("rouge")
    assert saved["suites"]["omni-synth"]["metric"].startswith("exact_match")
    markdown = (folder / "report.md").read_text()
    assert "| suite | metric | score | items | status | subsets |" in markdown
    assert all(f"| {name} |" in markdown for name in SUITES)


def test_the_demo_model_answers_the_synthetic_tasks_through_evalscope(url_run: RunReport) -> None:
    """The trained demo model reads images, clips and sounds: only media can give these answers."""
    omni = url_run.suites["omni-synth"]
    assert omni.score is not None and omni.score >= 0.75
    subsets = {name: s.score for name, s in omni.subsets.items()}
    assert subsets["pitch"] >= 0.75 and subsets["colour"] >= 0.75  # pitch needs the audio, colour the image
    assert subsets["motion"] >= 0.5  # 4 directions: chance is 0.25


def test_video_and_audio_reach_the_server_as_openai_parts(url_run: RunReport) -> None:
    """EvalScope's record of what it sent: a video part for motion items, an audio part for pitch items."""
    work = Path(url_run.suites["omni-synth"].evalscope_dir or "")
    sent: dict[str, set[str]] = {}
    for subset in ("motion", "pitch", "mixed"):
        [file] = work.glob(f"predictions/**/*_{subset}.jsonl")
        for line in file.read_text().splitlines():
            for message in json.loads(line)["messages"]:
                if isinstance(message["content"], list):
                    sent.setdefault(subset, set()).update(part["type"] for part in message["content"])
    assert "video" in sent["motion"] and "audio" in sent["pitch"] and {"image", "audio"} <= sent["mixed"]


def test_a_metric_that_cannot_be_computed_is_an_error_not_zero(
    demo_server: RunningServer, eval_cache: Path, tmp_path: Path
) -> None:
    """Through the CLI. BLEU needs NLTK's punkt_tab, which is not installed and must not be downloaded:
    EvalScope records 0.0 for it; the report lists the failure instead and keeps the primary (Rouge) score."""
    suite = tmp_path / "with-bleu.yaml"
    suite.write_text(
        "name: with-bleu\ndescription: BLEU needs NLTK data that is not there\nformat: qa\nscoring: rouge\n"
        f"metrics: [Rouge, BLEU]\ndata: {Path(__file__).parents[1] / 'eval' / 'text-qa'}\nsubsets: [capitals]\n"
    )
    args = ["eval", "--url", f"{demo_server.base_url}/v1", "--suite", str(suite), "--limit", "2", "--no-progress"]
    out = CliRunner().invoke(_cli(), [*args, "--output", str(tmp_path / "run"), "--cache-dir", str(eval_cache)])
    assert out.exit_code == 0, out.output  # the suite itself is complete: its primary metric was computed
    assert "| with-bleu | rouge" in out.output and f"report: {tmp_path / 'run' / 'report.json'}" in out.output
    assert "## Errors" in out.output and "metric BLEU could not be computed for 2 items" in out.output
    result = RunReport.load(tmp_path / "run").suites["with-bleu"]
    assert result.score is not None and result.status == "complete"
    assert any("metric BLEU could not be computed for 2 items" in e for e in result.errors), result.errors


def test_relative_output_and_cache_folders_work_from_the_shell(
    demo_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``omniserve eval --output run --cache-dir cache`` as typed in a shell: EvalScope's child runs in a folder
    of its own, so a relative job path once made every EvalScope-scored suite fail (FileNotFoundError)."""
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--url", f"{demo_server.base_url}/v1", "--suite", "text-qa", "--limit", "1", "--no-progress"]
    out = CliRunner().invoke(_cli(), [*args, "--output", "run", "--cache-dir", "cache"])

    assert out.exit_code == 0, out.output
    result = RunReport.load(tmp_path / "run").suites["text-qa"]
    assert result.status == "complete" and result.score is not None, result.errors
    assert f"report: {tmp_path / 'run' / 'report.json'}" in out.output


def test_model_mode_starts_its_own_server_and_stops_it(demo_model: Path, eval_cache: Path, tmp_path: Path) -> None:
    report = run_evaluation(
        EvalOptions(suites=["text-mcq"], model=demo_model, limit=2, output=tmp_path / "run", cache_dir=eval_cache)
    )
    assert report.complete and report.suites["text-mcq"].samples.scored == 4
    assert report.target["mode"] == "model" and report.target["model_path"] == str(demo_model.resolve())
    assert report.target["engine"] == "transformers" and report.target["model"] == demo_model.name
    with pytest.raises(httpx.TransportError):  # the server it started is gone
        httpx.get(f"{report.target['url']}/models", timeout=2)
    assert "Application startup complete" in (tmp_path / "run" / "server.log").read_text()


def test_unreachable_url_says_what_was_tried(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(EndpointError) as info:
        run_evaluation(
            EvalOptions(suites=["text-mcq"], url=f"http://127.0.0.1:{port}", output=tmp_path, cache_dir=tmp_path)
        )
    message = str(info.value)
    assert f"tried GET http://127.0.0.1:{port}/v1/models; GET http://127.0.0.1:{port}/models" in message
    assert "ConnectError" in message


def test_a_server_that_is_not_openai_compatible_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>not an API</html>")
    handler = lambda *a: SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        with pytest.raises(EndpointError, match=r"tried GET .*/v1/models\).*answered 404 without an OpenAI model list"):
            run_evaluation(EvalOptions(suites=["text-mcq"], url=url, output=tmp_path / "run", cache_dir=tmp_path))
    finally:
        httpd.shutdown()


def test_a_server_dying_mid_run_keeps_partial_results(tiny_omni: Path, eval_cache: Path, tmp_path: Path) -> None:
    """A real ``omniserve deploy`` process killed while EvalScope is halfway through a suite."""
    slow = tmp_path / "slow-qa.yaml"  # the random tiny model writes 200 tokens per answer: seconds per suite
    data = Path(__file__).parents[1] / "eval" / "text-qa"
    slow.write_text(
        "name: slow-qa\ndescription: long answers\nformat: qa\nscoring: rouge\n"
        f"data: {data}\nsubsets: [capitals, numbers]\ngeneration: {{max_tokens: 200}}\n"
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "omniserve.cli", "deploy", "--model", str(tiny_omni), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        output = tmp_path / "run"
        options = EvalOptions(
            suites=[str(slow), "text-mcq"],
            url=f"http://127.0.0.1:{port}/v1",
            output=output,
            cache_dir=eval_cache,
            concurrency=1,
        )
        outcome: dict[str, RunReport] = {}
        runner = threading.Thread(target=lambda: outcome.setdefault("report", run_evaluation(options)))
        runner.start()
        while not any(p.stat().st_size for p in output.glob("evalscope/slow-qa/work/predictions/**/*.jsonl")):
            assert runner.is_alive() and time.monotonic() < deadline, "no item finished"
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        runner.join(timeout=120)
        assert not runner.is_alive()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    report = outcome["report"]
    slow_result, mcq = report.suites["slow-qa"], report.suites["text-mcq"]
    assert slow_result.status == "incomplete" and 1 <= slow_result.samples.scored < 20
    assert slow_result.score is not None  # the items scored before the crash keep their score
    assert "stopped answering" in slow_result.errors[0] and "run stopped after" in slow_result.errors[0]
    assert mcq.status == "not-run" and not report.complete
    saved = RunReport.load(output)
    assert saved.suites["slow-qa"].status == "incomplete" and saved.complete is False


def test_cli_reports_bad_input_with_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(_cli(), ["eval", "--suite", "nope", "--url", "http://127.0.0.1:9/v1"])
    assert out.exit_code == 2 and "unknown suite 'nope'" in out.output
    out = runner.invoke(_cli(), ["eval", "--suite", "text-mcq", "--url", "http://x/v1", "--model", str(tmp_path)])
    assert out.exit_code == 2 and "exactly one of --model" in out.output
    out = runner.invoke(_cli(), ["eval", "--url", "http://x/v1"])
    assert out.exit_code == 2 and "--suite: field required" in out.output


def test_compare_plots_runs_with_their_retention(url_run: RunReport, tmp_path: Path) -> None:
    # a second run whose omni-synth score is half the first: retention 50%
    first = Path(url_run.options["output"])
    halved = RunReport.load(first)
    halved.target["quant"] = "damaged"
    score = halved.suites["omni-synth"].score
    assert score is not None and score > 0
    halved.suites["omni-synth"].score = score / 2
    halved.write(tmp_path / "halved")
    out = CliRunner().invoke(
        _cli(), ["eval", "compare", str(first), str(tmp_path / "halved"), "--output", str(tmp_path / "cmp")]
    )
    assert out.exit_code == 0, out.output
    assert "| omni-synth |" in out.output and "(50%)" in out.output
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["labels"] == ["tiny-omni-demo", "tiny-omni-demo (damaged)"]
    assert saved["retention"]["tiny-omni-demo (damaged)"]["omni-synth"] == pytest.approx(0.5)
    assert saved["retention"]["tiny-omni-demo (damaged)"]["text-mcq"] is None  # baseline 0: undefined, not a number
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_compare_refuses_a_folder_without_a_report(tmp_path: Path) -> None:
    from omniserve.eval.errors import EvalError

    with pytest.raises(EvalError, match="not an evaluation run folder"):
        compare_runs([tmp_path], tmp_path / "out")


def test_a_server_with_an_api_key(tiny_qwen2: Path, eval_cache: Path, tmp_path: Path) -> None:
    server = start_server(tiny_qwen2, name="keyed", server={"api_keys": ("s3cret-key",)})
    try:
        url = f"{server.base_url}/v1"
        with pytest.raises(EndpointError, match=r"answered 401 .*pass the server's key with --api-key"):
            run_evaluation(EvalOptions(suites=["text-mcq"], url=url, output=tmp_path / "a", cache_dir=eval_cache))
        options = EvalOptions(
            suites=["text-mcq"], url=url, api_key="s3cret-key", limit=1, output=tmp_path / "b", cache_dir=eval_cache
        )
        report = run_evaluation(options)
    finally:
        server.stop()
    assert report.complete and report.suites["text-mcq"].samples.scored == 2
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert "s3cret-key" not in written  # neither our job/report files nor EvalScope's logs hold the key
