"""``omniserve bench --audio-output chat|speech`` against a real server on the tiny speaking Omni."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from omniserve.eval.bench import BenchOptions, run_bench
from omniserve.eval.bench_audio import AudioBenchReport
from omniserve.eval.cli import bench_command
from tests.conftest import RunningServer
from tests.speaking_server import speaking_server

MAX_SECONDS = 1.0


@pytest.fixture(scope="module")
def server(speaking_model: Path) -> Iterator[RunningServer]:
    with speaking_server(speaking_model, speech_max_seconds=MAX_SECONDS, speech_max_waiting=16) as srv:
        yield srv


def test_chat_audio_output_levels_report_ttfab_and_realtime_factor(server: RunningServer, tmp_path: Path) -> None:
    report = run_bench(
        BenchOptions(
            url=f"{server.base_url}/v1",
            audio_output="chat",
            concurrency=[1, 2],
            requests=2,
            max_tokens=8,
            output=tmp_path,
            cache_dir=tmp_path / "cache",
        )
    )
    assert isinstance(report, AudioBenchReport)
    assert [level.concurrency for level in report.levels] == [1, 2]
    for level in report.levels:
        assert level.succeeded == 2 and level.failed == 0, level.errors
        assert level.ttfab_ms.p50 is not None and 0 < level.ttfab_ms.p50 <= level.latency_s.p99 * 1000
        assert 0 < level.audio_seconds <= 2 * (MAX_SECONDS * 3)  # a few segments of at most MAX_SECONDS each
        assert level.realtime_factor == pytest.approx(level.audio_seconds / level.seconds)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["options"]["voice"] == "Chelsie"  # the server's first voice
    assert "TTFAB ms p50/p99" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0 and (tmp_path / "bench.html").is_file()


def test_speech_endpoint_through_the_cli(server: RunningServer, tmp_path: Path) -> None:
    argv = ["--url", f"{server.base_url}/v1", "--audio-output", "speech", "--voice", "Ethan"]
    argv += ["--concurrency", "2", "--requests", "2", "--output", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    app = typer.Typer()
    app.command("bench")(bench_command)
    app.command("unused")(lambda: None)  # two commands: typer then dispatches on the name, as omniserve's app
    result = CliRunner().invoke(app, ["bench", *argv])
    assert result.exit_code == 0, result.output
    assert "Audio benchmark of tiny-speaking (/v1/audio/speech, streamed pcm, voice Ethan)" in result.output
    [level] = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert level["succeeded"] == 2 and 0 < level["audio_seconds"] <= 2 * MAX_SECONDS + 0.1


def test_audio_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="--voice"):
        BenchOptions(url="http://127.0.0.1:9/v1", voice="Ethan")
    with pytest.raises(ValidationError, match="--audio-output"):
        BenchOptions(url="http://127.0.0.1:9/v1", audio_output="speech", media="image")
