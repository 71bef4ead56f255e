"""The shipped demo model answers the synthetic tasks through a real server and the official openai client."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniserve.models.demo import demo_model_path
from omniserve.synth import write_synthetic
from omniserve.synth.evaluate import score_server
from tests.conftest import start_server
from tests.test_train_support import run_cli

ITEMS_PER_TASK = 20
#: The tasks the shipped weights were trained on (the tool and JSON tasks came later: docs/training.md).
DEMO_TASKS = ("colour", "motion", "pitch", "larger", "mixed")


@pytest.fixture(scope="module")
def test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first items of the seed-0 test split: questions the demo model never trained on."""
    output = write_synthetic(
        tmp_path_factory.mktemp("demo-eval") / "synth", seed=0, train_size=0, test_size=20, tasks=DEMO_TASKS
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
    finally:
        server.stop()

    assert set(scores) == set(DEMO_TASKS)
    report = {task: (s.correct, s.total, s.wrong[:3]) for task, s in scores.items()}
    assert all(s.total == ITEMS_PER_TASK for s in scores.values()), report
    assert all(s.accuracy >= 0.9 for s in scores.values()), report


def test_demo_model_renders_training_and_serving_prompts_identically(test_split: Path) -> None:
    result = run_cli("check-parity", "--model", demo_model_path(), "--data", test_split)

    assert result.exit_code == 0, result.output
