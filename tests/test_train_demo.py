"""The shipped demo model answers the synthetic tasks through a real server and the official openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omniserve.eval.asr_suite import WerScore
from omniserve.models.demo import demo_model_path
from omniserve.synth import write_synthetic
from omniserve.synth.evaluate import score_server
from tests.conftest import RunningServer, start_server
from tests.test_train_support import run_cli

ITEMS_PER_TASK = 20
#: The tasks the shipped weights answer (docs/training.md): exact match through the server, at least 90 % each.
#: ``tool_colour`` is sent with its strict ``report_colour`` tool (``tool_choice`` auto: the model decides to call).
DEMO_TASKS = ("colour", "motion", "pitch", "larger", "mixed", "tool_colour", "json_colour")
#: The spoken digit words, scored by word error rate (1-3 words: a tiny model does not get every clip exactly).
SPOKEN_TASK = "spoken"
#: The shipped weights' WER on the 50 clips was 0.008 at release (docs/training.md); the limit leaves room for
#: another CPU's float rounding. Untrained weights score about 1.0.
SPOKEN_WER_LIMIT = 0.1


@pytest.fixture(scope="module")
def test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first items of the seed-0 test split: questions the demo model never trained on."""
    output = write_synthetic(
        tmp_path_factory.mktemp("demo-eval") / "synth",
        seed=0,
        train_size=0,
        test_size=50,
        tasks=(*DEMO_TASKS, SPOKEN_TASK),
    )
    return output.output / "test.jsonl"


def test_demo_model_is_a_small_checkpoint_folder() -> None:
    folder = demo_model_path()

    assert (folder / "config.json").is_file() and (folder / "chat_template.jinja").is_file()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 5 * 1024 * 1024


def test_demo_model_scores_at_least_90_percent_on_every_task_through_the_server(test_split: Path) -> None:
    # The app loads the engine and the renderer in two threads at once; if neither found transformers
    # imported yet, its lazy module can fail one of them ("cannot import name 'AutoProcessor'").
    import transformers  # noqa: F401

    server = start_server(demo_model_path(), name="omni-demo", engine={"max_concurrency": 16, "max_queue": 128})
    try:
        scores = score_server(server.client(), "omni-demo", test_split, per_task=ITEMS_PER_TASK, concurrency=16)
        spoken = _transcribe_spoken(server, test_split)
    finally:
        server.stop()

    assert set(scores) == {*DEMO_TASKS, SPOKEN_TASK}
    report = {task: (s.correct, s.total, s.wrong[:3]) for task, s in scores.items() if task != SPOKEN_TASK}
    assert all(scores[task].total == ITEMS_PER_TASK for task in DEMO_TASKS), report
    assert all(scores[task].accuracy >= 0.9 for task in DEMO_TASKS), report
    assert spoken.total == 50 and spoken.wer is not None
    assert spoken.wer <= SPOKEN_WER_LIMIT, (spoken.wer, spoken.wrong[:5])


def _transcribe_spoken(server: RunningServer, test_split: Path) -> WerScore:
    """The spoken clips through ``/v1/audio/transcriptions`` (the server's own instruction), scored by WER."""
    score = WerScore()
    client = server.client()
    for line in test_split.read_text().splitlines():
        record = json.loads(line)
        if record["task"] != SPOKEN_TASK:
            continue
        audio = next(p for p in record["messages"][-2]["content"] if p["type"] == "audio_url")
        clip = test_split.parent / audio["audio_url"]["url"]
        with clip.open("rb") as file:
            text = client.audio.transcriptions.create(model="omni-demo", file=file, response_format="text")
        score.add(record["id"], record["answer"], str(text))
    return score


def test_demo_model_renders_training_and_serving_prompts_identically(test_split: Path) -> None:
    result = run_cli("check-parity", "--model", demo_model_path(), "--data", test_split)

    assert result.exit_code == 0, result.output
