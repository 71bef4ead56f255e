"""The LoRA loop: adapters written by ``omniserve train --lora`` are served as they are and checked by parity.

Two adapters are trained here on different tasks (one learns to answer "alpha", the other "beta"), so
their answers differ; one server serves the base and both adapters side by side, and each adapter's
greedy answer in a mixed batch must equal the merged model the same training run saved, served alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import start_server
from tests.test_train_support import run_cli, write_jsonl

QUESTIONS = ("What is your name?", "Say something.", "Which word do you know?", "Answer me.", "Hello?", "Go on.")
PROMPT = [{"role": "user", "content": "Tell me the word."}]


def _train(base: Path, data: Path, output: Path) -> Path:
    result = run_cli(
        "train",
        "--model", base,
        "--data", data,
        "--output", output,
        "--lora",
        "--lora-rank", "4",
        "--max-steps", "6",
        "--batch-size", "6",
        "--learning-rate", "5e-2",
        "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def trained(tiny_omni: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each task's training output: ``adapter/`` (served as is) beside the merged model."""
    root = tmp_path_factory.mktemp("lora-loop")
    runs = {}
    for word in ("alpha", "beta"):
        data = write_jsonl(
            root / f"{word}.jsonl",
            [[{"role": "user", "content": q}, {"role": "assistant", "content": word}] for q in QUESTIONS],
        )
        runs[word] = _train(tiny_omni, data, root / word)
    return runs


def _answer(client: object, model: str) -> str:
    reply = client.chat.completions.create(  # type: ignore[attr-defined]
        model=model, messages=PROMPT, max_tokens=6, temperature=0
    )
    return reply.choices[0].message.content


def test_trained_adapters_are_served_as_written_each_equal_to_its_merged_model(
    tiny_omni: Path, trained: dict[str, Path]
) -> None:
    expected = {}
    for word, output in trained.items():
        alone = start_server(output, name="merged", engine={"dtype": "float32"})
        try:
            expected[word] = _answer(alone.client(), "merged")
        finally:
            alone.stop()
    adapters = {word: output / "adapter" for word, output in trained.items()}
    srv = start_server(tiny_omni, name="base", engine={"dtype": "float32"}, server={"lora": adapters})
    try:
        base_answer = _answer(srv.client(), "base")
        names = ["alpha", "beta", "base"] * 3
        with ThreadPoolExecutor(len(names)) as pool:
            answers = list(pool.map(lambda m: _answer(srv.client(), m), names))
    finally:
        srv.stop()
    assert expected["alpha"] != expected["beta"], "the two trained adapters answer alike: the test proves nothing"
    assert answers == [{"alpha": expected["alpha"], "beta": expected["beta"], "base": base_answer}[n] for n in names]


def test_check_parity_accepts_the_adapter_folder(tiny_omni: Path, trained: dict[str, Path], tmp_path: Path) -> None:
    """``check-parity --model ADAPTER`` checks against the base the adapter records (its template and processor)."""
    adapter = trained["alpha"] / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).resolve() == tiny_omni.resolve()
    data = write_jsonl(
        tmp_path / "parity.jsonl", [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "alpha"}]]
    )
    result = run_cli("check-parity", "--model", adapter, "--data", data)
    assert result.exit_code == 0, result.output
    assert "token-identical" in result.output
    refused = run_cli("check-parity", "--model", tmp_path, "--data", data)  # neither a model nor an adapter
    assert refused.exit_code != 0
