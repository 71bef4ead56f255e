"""``omniserve bench``: EvalScope's perf tool against the real omniserve server, local data only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from omniserve.eval.bench import BenchOptions, BenchReport, run_bench
from omniserve.eval.bench_data import write_synthetic
from omniserve.eval.cli import bench_command, eval_app
from omniserve.eval.errors import BenchError, DatasetMissing
from tests.conftest import RunningServer, start_server


@pytest.fixture(scope="module")
def server(tiny_omni: Path) -> Iterator[RunningServer]:
    srv = start_server(tiny_omni, name="tiny-omni", engine={"max_concurrency": 8, "max_queue": 64})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def text_bench(server: RunningServer, tiny_omni: Path, tmp_path_factory: pytest.TempPathFactory) -> BenchReport:
    output = tmp_path_factory.mktemp("bench")
    options = BenchOptions(
        url=f"{server.base_url}/v1",
        concurrency=[1, 4],
        requests=8,
        max_tokens=16,
        tokenizer=tiny_omni,
        output=output,
        cache_dir=output / "cache",
    )
    return run_bench(options)


def test_two_concurrency_levels_give_latency_and_throughput(text_bench: BenchReport) -> None:
    saved = json.loads((text_bench.folder / "bench.json").read_text())
    assert [level["concurrency"] for level in saved["levels"]] == [1, 4]
    for level in saved["levels"]:
        assert (level["requests"], level["succeeded"], level["failed"]) == (8, 8, 0)
        assert level["requests_per_s"] > 0 and level["output_tokens_per_s"] > 0
        assert level["avg_output_tokens"] == pytest.approx(16, abs=1)
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "latency_s"):
            stats = level[metric]
            assert stats["mean"] > 0 and stats["p50"] > 0 and stats["p99"] >= stats["p50"]
    assert saved["target"]["mode"] == "url" and saved["versions"]["evalscope"] == "1.14.1"
    table = (text_bench.folder / "bench.md").read_text()
    assert "| concurrency | ok/failed | req/s | out tok/s | TTFT ms mean/p50/p99 |" in table
    assert "| 1 | 8/0 |" in table and "| 4 | 8/0 |" in table
    png = (text_bench.folder / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10000


def test_multimodal_load_carries_images_and_audio(
    server: RunningServer, text_bench: BenchReport, tmp_path: Path
) -> None:
    report = run_bench(
        BenchOptions(
            url=f"{server.base_url}/v1",
            concurrency=[2],
            requests=4,
            max_tokens=8,
            media="image+audio",
            output=tmp_path,
            cache_dir=tmp_path / "cache",
        )
    )
    [level] = report.levels
    assert level.succeeded == 4 and level.failed == 0
    first = json.loads((tmp_path / "requests.jsonl").read_text().splitlines()[0])
    kinds = [part["type"] for part in first["messages"][0]["content"]]
    assert kinds == ["image_url", "input_audio", "text"]
    # the server counted the image and audio tokens: far more prompt tokens than the text-only load
    assert level.avg_input_tokens is not None and text_bench.levels[0].avg_input_tokens is not None
    assert level.avg_input_tokens > text_bench.levels[0].avg_input_tokens + 20


def _prompt_tokens(server: RunningServer, content: list[dict[str, object]]) -> int:
    reply = server.client().chat.completions.create(
        model="tiny-omni", messages=[{"role": "user", "content": content}], max_tokens=1
    )
    return reply.usage.prompt_tokens


def _mean_prompt_tokens(server: RunningServer, requests: Path) -> float:
    """The server's prompt-token count of each request in a bench's requests.jsonl, averaged."""
    lines = requests.read_text().splitlines()
    return sum(_prompt_tokens(server, json.loads(line)["messages"][0]["content"]) for line in lines) / len(lines)


def test_multi_image_and_video_shapes_reach_the_model_whole(server: RunningServer, tmp_path: Path) -> None:
    """``--media image --images 3`` and ``--media video --video-frames 8``: every image and frame is counted.

    The server's own prompt-token counts of one request's parts (text alone, with one image, with all
    three; a 4-frame against the 8-frame clip) are what EvalScope's averages must show.
    """

    def bench(folder: str, **shape: object) -> BenchReport:
        options = BenchOptions(
            url=f"{server.base_url}/v1", concurrency=[2], requests=2, max_tokens=4, output=tmp_path / folder,
            cache_dir=tmp_path / "cache", **shape,
        )  # fmt: skip
        return run_bench(options)

    images = bench("images", media="image", images=3)
    [level] = images.levels
    assert (level.succeeded, level.failed) == (2, 0)
    first = json.loads((tmp_path / "images" / "requests.jsonl").read_text().splitlines()[0])
    parts = first["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["image_url"] * 3 + ["text"]
    assert len({part["image_url"]["url"] for part in parts[:3]}) == 3  # three different pictures
    text, one, three = (_prompt_tokens(server, parts[3:]), _prompt_tokens(server, [parts[0], parts[3]]),
                        _prompt_tokens(server, parts))  # fmt: skip
    assert one > text and three - text == pytest.approx(3 * (one - text), abs=2)
    assert level.avg_input_tokens == pytest.approx(_mean_prompt_tokens(server, tmp_path / "images" / "requests.jsonl"))
    assert "media image x3 images" in images.markdown()

    video = bench("video", media="video", video_frames=8)
    [level] = video.levels
    assert (level.succeeded, level.failed) == (2, 0)
    first = json.loads((tmp_path / "video" / "requests.jsonl").read_text().splitlines()[0])
    parts = first["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["video_url", "text"]
    assert parts[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    short = tmp_path / "short.jsonl"
    write_synthetic(short, 1, "video", video_frames=4)
    four = _prompt_tokens(server, json.loads(short.read_text())["messages"][0]["content"])
    eight = _prompt_tokens(server, parts)
    assert eight > four > _prompt_tokens(server, parts[1:])
    assert level.avg_input_tokens == pytest.approx(_mean_prompt_tokens(server, tmp_path / "video" / "requests.jsonl"))
    assert "media video (8 frames)" in video.markdown()
    with pytest.raises(ValidationError, match="--images applies to --media image"):
        BenchOptions(url="http://127.0.0.1:9/v1", media="video", images=2)
    with pytest.raises(ValidationError, match="--video-frames applies to --media video"):
        BenchOptions(url="http://127.0.0.1:9/v1", media="image", video_frames=4)


def test_bench_with_model_and_a_user_file_through_the_cli(tiny_qwen2: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.command("bench")(bench_command)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Count to {i}."}) + "\n" for i in range(4)))
    args = ["bench", "--model", str(tiny_qwen2), "--concurrency", "1,2", "--requests", "4", "--max-tokens", "8"]
    args += ["--dataset", str(questions), "--no-stream", "--output", str(tmp_path / "out")]
    out = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 0, out.output
    assert "| 1 | 4/0 |" in out.output and "| 2 | 4/0 |" in out.output
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["target"]["mode"] == "model" and saved["options"]["stream"] is False
    assert saved["options"]["dataset"] == str(questions)
    assert "Application startup complete" in (tmp_path / "out" / "server.log").read_text()


def test_bad_benchmark_data_is_refused_before_any_request(server: RunningServer, tmp_path: Path) -> None:
    url = f"{server.base_url}/v1"
    with pytest.raises(DatasetMissing, match="does not exist"):
        run_bench(
            BenchOptions(url=url, dataset=str(tmp_path / "nope.jsonl"), output=tmp_path / "a", cache_dir=tmp_path)
        )
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "hi"}\n')
    with pytest.raises(BenchError, match=r"'question' .* or 'messages'"):
        run_bench(BenchOptions(url=url, dataset=str(wrong), output=tmp_path / "b", cache_dir=tmp_path))
    with pytest.raises(ValidationError, match="--media applies to --dataset synthetic"):
        BenchOptions(url=url, dataset=str(wrong), media="image")


def test_ignore_eos_makes_every_reply_max_tokens_long(tmp_path: Path) -> None:
    """The trained demo model answers in a couple of tokens; a load test must not depend on that."""
    from omniserve.models.demo import demo_model_path

    demo = demo_model_path()
    srv = start_server(demo, name="tiny-omni-demo", engine={"max_concurrency": 4, "max_queue": 16})
    try:

        def bench(ignore_eos: bool) -> BenchReport:
            options = BenchOptions(
                url=f"{srv.base_url}/v1",
                concurrency=[2],
                requests=4,
                max_tokens=24,
                ignore_eos=ignore_eos,
                tokenizer=demo,
                output=tmp_path / f"ignore-eos-{ignore_eos}",
                cache_dir=tmp_path / "cache",
            )
            return run_bench(options)

        forced, natural = bench(True), bench(False)
    finally:
        srv.stop()
    assert forced.levels[0].avg_output_tokens == pytest.approx(24, abs=0.5)
    assert natural.levels[0].avg_output_tokens < 12, "the demo model stops early by itself"
    assert "24 tokens out" in forced.markdown() and "up to 24 tokens out" in natural.markdown()
