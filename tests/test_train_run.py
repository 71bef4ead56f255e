"""Real training runs on the tiny omni model: the loss goes down, the output serves, LoRA, and resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from omniserve.train.checkpoints import STATE_FILE, complete_checkpoints
from omniserve.train.options import TrainOptions
from omniserve.train.sft import TrainSetupError, run_training
from tests.conftest import start_server
from tests.test_train_support import data_url, run_cli, write_mixed_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mixed_dataset(tmp_path_factory.mktemp("train-data"))


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_short_run_lowers_the_loss_and_saves_a_servable_model_laid_out_like_its_source(
    tiny_omni: Path, data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    result = run_training(
        TrainOptions(
            model=tiny_omni,
            data=data,
            output=output,
            max_steps=8,
            batch_size=3,
            grad_accum=2,
            learning_rate=3e-3,
            lr_scheduler="constant",
            save_steps=4,
            progress=False,
        )
    )

    assert result.global_step == 8 and len(result.losses) == 8
    assert sum(result.losses[-2:]) < 0.7 * sum(result.losses[:2])
    assert result.tokens_seen > 0
    # only the weights differ from the source: same config, processor, template, tokenizer, speaker file
    for source_file in tiny_omni.iterdir():
        if source_file.suffix != ".safetensors":
            assert (output / source_file.name).read_bytes() == source_file.read_bytes(), source_file.name
    before, after = _weights(tiny_omni), _weights(output)
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before if k.startswith("thinker.model."))
    assert [p.name for p in complete_checkpoints(output / "checkpoints")] == ["checkpoint-4", "checkpoint-8"]
    # and the server takes it as it is
    server = start_server(output, name="trained")
    try:
        from tests.media_factory import png_bytes

        image = {"type": "image_url", "image_url": {"url": data_url("image/png", png_bytes(64, 64))}}
        reply = server.client().chat.completions.create(
            model="trained",
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "What colour?"}]}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


def test_packing_run_trains_and_a_second_run_into_the_same_output_is_refused(
    tiny_omni: Path, data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "packed"
    options = TrainOptions(
        model=tiny_omni,
        data=data,
        output=output,
        packing=True,
        max_length=256,
        max_steps=6,
        batch_size=1,
        learning_rate=3e-3,
        lr_scheduler="constant",
        save_steps=3,
        progress=False,
    )
    result = run_training(options)

    assert result.losses[-1] < result.losses[0]
    with pytest.raises(TrainSetupError, match="holds checkpoints of an earlier run; pass --resume"):
        run_training(options)


def test_lora_saves_an_adapter_and_a_merged_model_that_touches_only_the_language_model(
    tiny_omni: Path, data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "lora"
    result = run_cli(
        "train",
        "--model", tiny_omni,
        "--data", data,
        "--output", output,
        "--lora",
        "--lora-rank", "4",
        "--max-steps", "3",
        "--batch-size", "3",
        "--learning-rate", "1e-2",
        "--no-progress",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    adapter = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    before, after = _weights(tiny_omni), _weights(output)
    assert before.keys() == after.keys()  # merged: no adapter weights left in the model
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed, "merging the adapter changed no weight"
    assert all(".layers." in k and k.startswith("thinker.model.") for k in changed)
    assert not any(k.startswith(("thinker.visual.", "thinker.audio_tower.")) for k in changed)


def test_sigterm_keeps_the_last_complete_checkpoint_and_resume_continues_from_it(
    tiny_omni: Path, data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "interrupted"
    command = [
        sys.executable, "-m", "omniserve.train", "train",
        "--model", str(tiny_omni), "--data", str(data), "--output", str(output),
        "--max-steps", "500", "--save-steps", "2", "--batch-size", "2",
        "--lr-scheduler", "constant", "--no-progress",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(complete_checkpoints(output / "checkpoints")) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoints appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130, stderr
    assert "interrupted; the last complete checkpoint is" in stderr
    checkpoints = complete_checkpoints(output / "checkpoints")
    assert len(checkpoints) == 2  # rotation keeps two
    for checkpoint in checkpoints:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        assert checkpoint.name == f"checkpoint-{state['global_step']}"
        assert _weights(checkpoint)  # the weights file is whole
        assert (checkpoint / "optimizer.pt").stat().st_size > 0
    last_step = int(checkpoints[-1].name.split("-")[1])

    result = run_training(
        TrainOptions(
            model=tiny_omni,
            data=data,
            output=output,
            resume=True,
            max_steps=last_step + 2,
            save_steps=2,
            batch_size=2,
            lr_scheduler="constant",
            progress=False,
        )
    )

    assert result.resumed_from == checkpoints[-1]
    assert result.global_step == last_step + 2
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".staging-")]
    final_state = json.loads((output / "checkpoints" / f"checkpoint-{last_step + 2}" / STATE_FILE).read_text())
    logged_steps = [entry["step"] for entry in final_state["log_history"] if "loss" in entry]
    assert logged_steps[-2:] == [last_step + 1, last_step + 2]
    assert (output / "config.json").is_file()
    assert os.access(output / "model.safetensors", os.R_OK)
