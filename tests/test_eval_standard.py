"""Standard benchmarks (``--suite evalscope:NAME``) for real: EvalScope's own adapters and scoring.

The data are fixtures written for these tests in each benchmark's published layout
(``tests/fixtures/evalscope/``, made by ``make_fixtures.py``): EvalScope's own loader reads them as it
reads a download. One run scores every family (mcq, math, instruction following, vqa, asr, video) and
every image and audio set (MMMU, MMBench, AI2D, ChartQA, DocVQA, MathVista, LibriSpeech, MMAU) against
one real server on the demo model (12 EvalScope processes: the bulk of this file's time); the golden
check feeds fixed predictions through EvalScope's scoring (its mock model) and compares with the value
each benchmark's metric is documented to give.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from omniserve.eval.bench import BenchOptions, BenchReport, run_bench
from omniserve.eval.cli import eval_app
from omniserve.eval.compare import compare_runs
from omniserve.eval.errors import EvalError
from omniserve.eval.gate import InvalidGateSpec, check_gate_spec
from omniserve.eval.report import RunReport
from omniserve.eval.runner import EvalOptions, run_evaluation
from omniserve.eval.standard import CATALOGUE, UnsupportedModality
from omniserve.eval.worker import evalscope_env
from tests.conftest import RunningServer, start_server
from tests.fixtures.evalscope.make_fixtures import MMMU_SUBJECTS

FIXTURES = Path(__file__).parent / "fixtures" / "evalscope"
#: Benchmark -> items per subset in the fixtures (with --limit 2).
EXPECTED = {
    "mmlu": {"elementary_mathematics": 2, "astronomy": 2},
    "gsm8k": {"main": 2},
    "ifeval": {"default": 2},
    "chartqa": {"human_test": 2, "augmented_test": 1},
    "librispeech": {"test_clean": 2, "test_other": 1},
    "mvbench": {"action_antonym": 2},
    "mmmu": dict.fromkeys(MMMU_SUBJECTS, 1),  # EvalScope reads all 30 subject configs: one item each
    "mm_bench": {"en": 2, "cn": 1},
    "ai2d": {"default": 2},
    "docvqa": {"DocVQA": 2},
    "math_vista": {"default": 2},
    "mmau": {"test_mini": 2},
}


@pytest.fixture(scope="module")
def demo_server() -> Iterator[RunningServer]:
    from omniserve.models.demo import demo_model_path

    server = start_server(demo_model_path(), name="tiny-omni-demo", engine={"max_concurrency": 8, "max_queue": 64})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("standard-cache")


@pytest.fixture(scope="module")
def standard_run(demo_server: RunningServer, eval_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> RunReport:
    options = EvalOptions(
        suites=[f"evalscope:{name}" for name in EXPECTED],
        url=f"{demo_server.base_url}/v1",
        limit=2,
        max_tokens=32,
        media_max_frames=4,
        dataset_dir=FIXTURES,
        output=tmp_path_factory.mktemp("standard-run"),
        cache_dir=eval_cache,
    )
    return run_evaluation(options)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    return app


def test_every_family_runs_end_to_end_with_evalscope_scoring(standard_run: RunReport) -> None:
    folder = Path(standard_run.options["output"])
    saved = json.loads((folder / "report.json").read_text())
    assert saved["complete"] is True
    assert list(saved["suites"]) == [f"evalscope:{name}" for name in EXPECTED]
    for name, subsets in EXPECTED.items():
        result = saved["suites"][f"evalscope:{name}"]
        assert result["status"] == "complete" and result["errors"] == [], (name, result["errors"])
        assert {k for k in result["subsets"]} == set(subsets), name
        total = sum(subsets.values())
        assert result["samples"] == {"requested": total, "scored": total, "errored": 0}, name
        assert 0.0 <= result["score"] <= 1.0
    metrics = {name: saved["suites"][f"evalscope:{name}"]["metric"] for name in EXPECTED}
    assert metrics["chartqa"].startswith("relaxed_acc") and metrics["librispeech"].startswith("wer")
    assert metrics["ifeval"].startswith("prompt_level_strict") and metrics["mmlu"].startswith("accuracy")
    assert metrics["docvqa"].startswith("anls") and metrics["mmau"].startswith("accuracy")
    markdown = (folder / "report.md").read_text()
    assert all(f"| evalscope:{name} |" in markdown for name in EXPECTED)


def test_report_records_items_evalscope_version_file_hashes_and_media_options(standard_run: RunReport) -> None:
    for name, subsets in EXPECTED.items():
        details = standard_run.suites[f"evalscope:{name}"].standard
        assert details is not None
        assert details["items"] == sum(subsets.values()) and details["limit"] == 2
        assert details["evalscope"] == metadata.version("evalscope")
        assert details["media"] == {"max_frames": 4}
        folder = FIXTURES / name
        expected = {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*")
            if p.is_file()
        }
        assert details["files"] == expected and details["dataset_dir"] == str(folder.resolve())
    assert standard_run.options["media_max_frames"] == 4  # the run's own options are recorded too


def test_video_and_audio_reach_the_model_as_media_parts(standard_run: RunReport, demo_server: RunningServer) -> None:
    """The server counted the media's tokens: each item's prompt is longer than its text alone."""
    client = demo_server.client()
    for name, kind in (("mvbench", "video"), ("librispeech", "audio"), ("mmau", "audio")):
        work = Path(standard_run.suites[f"evalscope:{name}"].evalscope_dir or "")
        for file in work.glob("predictions/**/*.jsonl"):
            for line in file.read_text().splitlines():
                record = json.loads(line)
                message = next(m for m in record["messages"] if m["role"] == "user")
                kinds = [part["type"] for part in message["content"]]
                assert kind in kinds, kinds
                text = " ".join(part["text"] for part in message["content"] if part["type"] == "text")
                alone = client.chat.completions.create(
                    model="tiny-omni-demo", messages=[{"role": "user", "content": text}], max_tokens=1
                )
                assert record["model_output"]["usage"]["input_tokens"] > alone.usage.prompt_tokens + 8


def test_image_benchmarks_send_every_image_of_an_item(standard_run: RunReport) -> None:
    """Each image item reached the model with its pictures as image parts; MMMU's Art item carries two."""
    counts: dict[str, list[int]] = {}
    for name in ("mmmu", "mm_bench", "ai2d", "docvqa", "math_vista"):
        work = Path(standard_run.suites[f"evalscope:{name}"].evalscope_dir or "")
        for file in work.glob("predictions/**/*.jsonl"):
            for line in file.read_text().splitlines():
                message = next(m for m in json.loads(line)["messages"] if m["role"] == "user")
                counts.setdefault(f"{name}/{file.stem}", []).append(
                    sum(part["type"] == "image" for part in message["content"])
                )
    assert counts["mmmu/mmmu_Art"] == [2] and counts["mmmu/mmmu_Math"] == [1]
    assert counts["mm_bench/mm_bench_en"] == [1, 1] and counts["docvqa/docvqa_DocVQA"] == [1, 1]
    assert counts["ai2d/ai2d_default"] == [1, 1] and counts["math_vista/math_vista_default"] == [1, 1]


def test_media_options_are_sent_per_request(demo_server: RunningServer, eval_cache: Path, tmp_path: Path) -> None:
    """A frame count over the server's cap is refused by the server: the option travelled with each request."""
    options = EvalOptions(
        suites=["evalscope:mvbench"],
        url=f"{demo_server.base_url}/v1",
        limit=1,
        media_max_frames=100_000,
        dataset_dir=FIXTURES,
        output=tmp_path,
        cache_dir=eval_cache,
    )
    result = run_evaluation(options).suites["evalscope:mvbench"]
    assert result.status in ("incomplete", "error") and result.samples.errored == 1
    assert any("max_frames 100000 exceeds this server's cap" in error for error in result.errors), result.errors


def test_fixed_predictions_give_the_documented_metric_values(tmp_path: Path) -> None:
    """EvalScope's mock model answers every item with one fixed reply; the scores are worked out by hand.

    - GSM8K accuracy: ``\\boxed{7}`` matches 1 of 3 answers (7, 18, 6).
    - ChartQA relaxed accuracy: 3.1 is within 5% of "3" only: 1/3 (exact match would give 0).
    - LibriSpeech WER is corpus-level (errors pooled over reference words): "high tone" against
      "high tone" / "low tone" / "a middle tone" is 0 + 1 + 2 errors over 2 + 2 + 3 words = 3/7,
      where a mean of per-item WERs would be 0.389.
    - MMLU accuracy: every reply "ANSWER: B"; one of the four answers is B: 1/4.
    - IFEval prompt-level strict: a lowercase sentence without commas follows 2 of the 3 prompts'
      instructions (no comma, lowercase; not the end phrase): 2/3.
    - DocVQA ANLS gives partial credit: "totals" against "TOTAL" is 1 - 1/6 (one edit over six
      characters, case folded); against "MEMO" the similarity is under the 0.5 threshold, so 0:
      (5/6 + 0) / 2 = 5/12 (exact match would give 0).
    - MMAU accuracy: "ANSWER: B" is the second choice; one of the two answers ("low") is: 1/2.
    - MathVista: "ANSWER: A" is right for both multiple-choice items and not the number 5 of the
      free-form one: 2/3.
    - MMMU: "ANSWER: A" is right in the 28 subjects whose item answers A, wrong for Art (B) and for the
      open Math question (1): 28/30.
    """
    golden = {
        "gsm8k": ("The answer is \\boxed{7}", 1 / 3),
        "chartqa": ("ANSWER: 3.1", 1 / 3),
        "librispeech": ("high tone", 3 / 7),
        "mmlu": ("ANSWER: B", 1 / 4),
        "ifeval": ("the sea is calm today.", 2 / 3),
        "docvqa": ("ANSWER: totals", 5 / 12),
        "mmau": ("ANSWER: B", 1 / 2),
        "math_vista": ("ANSWER: A", 2 / 3),
        "mmmu": ("ANSWER: A", 28 / 30),
    }
    script = """
import json, sys
from pathlib import Path
from evalscope import TaskConfig, run_task
from evalscope.api.model import ModelOutput
from evalscope.report import Report
golden, fixtures, work = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
scores = {}
for name, (reply, _) in golden.items():
    config = TaskConfig(
        model="golden", eval_type="mock_llm",
        model_args={"custom_outputs": [ModelOutput.from_content("golden", reply) for _ in range(40)]},
        datasets=[name], dataset_args={name: {"local_path": str(fixtures / name)}}, dataset_hub="local",
        dataset_dir=str(work / "data"), work_dir=str(work / name), no_timestamp=True, eval_batch_size=1,
    )
    run_task(config)
    report = Report.from_json(str(next((work / name).glob(f"reports/**/{name}.json"))))
    scores[name] = [report.primary_metric.name, report.score]
(work / "scores.json").write_text(json.dumps(scores))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(golden), str(FIXTURES), str(tmp_path)],
        env=evalscope_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    for name, (_, value) in golden.items():
        metric, score = scores[name]
        assert score == pytest.approx(value, abs=1e-4), (name, metric, score)
    assert scores["librispeech"][0] == "wer:weighted_mean" and scores["chartqa"][0].startswith("relaxed_acc")


def test_list_suites_shows_builtin_and_standard_with_modality_and_metric() -> None:
    result = CliRunner().invoke(_cli(), ["eval", "--list-suites"])
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.startswith("| ")}
    assert {"omni-synth", "text-mcq"} <= set(rows)
    for name, entry in CATALOGUE.items():
        row = rows[f"evalscope:{name}"]
        assert f"| {entry.modality} |" in row and f"| {entry.family} |" in row
    assert "| wer |" in rows["evalscope:librispeech"] and "| relaxed_acc |" in rows["evalscope:chartqa"]
    assert "videomme" in result.output  # what EvalScope 1.14.1 cannot run is listed, not hidden


@pytest.mark.parametrize(
    ("name", "modality", "metric", "files"),
    [
        ("mmmu", "image", "accuracy", "<Subject>/validation-*.parquet"),
        ("mm_bench", "image", "accuracy", "en/dev-*.parquet, cn/dev-*.parquet"),
        ("ai2d", "image", "accuracy", "data/test-*.parquet"),
        ("docvqa", "image", "anls", "DocVQA/validation-*.parquet"),
        ("math_vista", "image", "accuracy", "data/testmini-*.parquet"),
        ("mmau", "audio", "accuracy", "data/test_mini-*.parquet"),
    ],
)
def test_each_image_and_audio_benchmark_is_listed_and_names_its_files_when_missing(
    name: str, modality: str, metric: str, files: str, tmp_path: Path
) -> None:
    listed = CliRunner().invoke(_cli(), ["eval", "--list-suites"])
    row = next(line for line in listed.output.splitlines() if line.startswith(f"| evalscope:{name} |"))
    assert f"| {modality} |" in row and f"| {metric} |" in row and files in row
    (tmp_path / "data" / name).mkdir(parents=True)  # the folder is there, its files are not
    url = ["--url", "http://127.0.0.1:9/v1", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "o")]
    result = CliRunner().invoke(
        _cli(), ["eval", "--suite", f"evalscope:{name}", "--dataset-dir", str(tmp_path / "data"), *url]
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert f"no data in {tmp_path / 'data' / name}" in errors[0] and files in errors[0]


def test_bad_benchmark_requests_exit_2_in_one_line_before_any_server(tmp_path: Path) -> None:
    url = ["--url", "http://127.0.0.1:9/v1", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "o")]

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(_cli(), ["eval", *args, *url])
        return result.exit_code, result.output

    code, out = run("--suite", "evalscope:mmlux")
    assert code == 2 and "unknown EvalScope benchmark 'mmlux'" in out and "evalscope:mmlu" in out
    # no data and no --allow-download: nothing is downloaded, the expected files are named
    code, out = run("--suite", "evalscope:gsm8k")
    assert code == 2 and "--dataset-dir" in out and "main/test-*.parquet" in out and "--allow-download" in out
    code, out = run("--suite", "evalscope:chartqa", "--dataset-dir", str(tmp_path))
    assert code == 2 and f"no data in {tmp_path / 'chartqa'}" in out and "data/test-*.parquet" in out
    # a folder in the wrong layout: EvalScope's loader says what is wrong, with the files expected
    broken = tmp_path / "broken"
    (broken / "gsm8k" / "main").mkdir(parents=True)
    (broken / "gsm8k" / "README.md").write_text((FIXTURES / "gsm8k" / "README.md").read_text())
    source = FIXTURES / "gsm8k" / "main" / "train-00000-of-00001.parquet"
    (broken / "gsm8k" / "main" / source.name).write_bytes(source.read_bytes())  # the test split is missing
    code, out = run("--suite", "evalscope:gsm8k", "--dataset-dir", str(broken))
    assert code == 2 and "EvalScope could not read the data" in out and "main/test-*.parquet" in out
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1


def test_a_benchmark_the_model_cannot_see_is_refused_before_it_starts(tiny_qwen2: Path, tmp_path: Path) -> None:
    server = start_server(tiny_qwen2, name="tiny-text")
    try:
        options = EvalOptions(
            suites=["evalscope:gsm8k", "evalscope:chartqa"],
            url=f"{server.base_url}/v1",
            dataset_dir=FIXTURES,
            output=tmp_path / "run",
            cache_dir=tmp_path / "cache",
        )
        with pytest.raises(UnsupportedModality, match="evalscope:chartqa: the served model 'tiny-text' does not take"):
            run_evaluation(options)
        assert not (tmp_path / "run" / "evalscope").exists()  # not even the text benchmark ran
    finally:
        server.stop()


def test_compare_puts_standard_and_builtin_suites_side_by_side(standard_run: RunReport, tmp_path: Path) -> None:
    """A second run (the first with one built-in suite added and worse scores) against the first.

    Retention of an error rate reads the other way: a WER that doubled kept half the quality.
    """
    saved = json.loads((Path(standard_run.options["output"]) / "report.json").read_text())
    runs = []
    for name, mmlu, wer in (("first", 1.0, 0.25), ("second", 0.5, 0.5)):
        report = json.loads(json.dumps(saved))
        report["suites"]["evalscope:mmlu"]["score"] = mmlu
        report["suites"]["evalscope:librispeech"]["score"] = wer
        if name == "second":  # a built-in suite beside the standard ones, in the second run only
            report["target"]["quant"] = "gptq"
            report["suites"]["text-mcq"] = {**report["suites"]["evalscope:mmlu"], "suite": "text-mcq", "standard": None}
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        runs.append(tmp_path / name)
    first, second = runs
    comparison = compare_runs([first, second], tmp_path / "compare")
    label = comparison.labels[1]
    assert comparison.retention[label]["evalscope:librispeech"] == pytest.approx(0.5)  # WER 0.25 -> 0.5
    assert comparison.retention[label]["evalscope:mmlu"] == pytest.approx(0.5)  # accuracy 1.0 -> 0.5
    assert "text-mcq" in comparison.suites and comparison.plot.is_file()


def test_gate_spec_for_a_standard_benchmark_is_checked_before_any_model_loads(tmp_path: Path) -> None:
    assert check_gate_spec("evalscope:gsm8k:1.0", dataset_dir=FIXTURES).max_drop == 1.0
    assert check_gate_spec("evalscope:gsm8k", dataset_dir=FIXTURES).suite == "evalscope:gsm8k"
    with pytest.raises(EvalError, match="no --gate-dataset-dir was given") as missing:
        check_gate_spec("evalscope:gsm8k:1.0")
    assert missing.value.exit_code == 2
    with pytest.raises(EvalError, match="close matches: evalscope:gsm8k"):
        check_gate_spec("evalscope:gsm8:1.0", dataset_dir=FIXTURES)
    with pytest.raises(InvalidGateSpec, match="falls as quality rises"):
        check_gate_spec("evalscope:librispeech:1", dataset_dir=FIXTURES)


def test_bench_open_loop_sweep_stops_at_the_first_rate_over_the_ttft_target(
    demo_server: RunningServer, tmp_path: Path
) -> None:
    """``bench --request-rate`` (open loop) with ``--slo-ttft-ms``: a target every rate meets, one none can."""

    def sweep(slo: float, folder: str) -> BenchReport:
        options = BenchOptions(
            url=f"{demo_server.base_url}/v1",
            request_rate=[40, 20],
            slo_ttft_ms=slo,
            requests=6,
            max_tokens=8,
            output=tmp_path / folder,
            cache_dir=tmp_path / "cache",
        )
        return run_bench(options)

    loose = sweep(60_000, "loose")
    assert [level.rate for level in loose.levels] == [20, 40]  # lowest first
    assert all(level.concurrency == -1 and level.succeeded == 6 for level in loose.levels)
    assert loose.slo == {"ttft_p99_ms": 60_000, "highest_rate_held": 40, "exceeded_at": None}
    assert "| 20 req/s | 6/0 |" in loose.markdown() and "highest rate that held 40 req/s" in loose.markdown()
    strict = sweep(0.001, "strict")  # no first token arrives within a microsecond: stops after the first rate
    assert [level.rate for level in strict.levels] == [20]
    assert strict.slo == {"ttft_p99_ms": 0.001, "highest_rate_held": None, "exceeded_at": 20}
    saved = json.loads((tmp_path / "strict" / "bench.json").read_text())
    assert saved["slo"]["exceeded_at"] == 20 and saved["levels"][0]["rate"] == 20
