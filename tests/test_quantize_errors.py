"""Bad input to ``omniserve quantize``: each refused with its own error type and a message that says what to do.

Most checks need files only and fail before any model is loaded; the rest use the tiny models.
"""

from __future__ import annotations

import base64
import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from omniserve.quantize.errors import (
    AlreadyQuantized,
    CalibrationDataError,
    InvalidQuantizeOption,
    NotACheckpoint,
    NotEnoughDisk,
    OutputExists,
    RecipeError,
    SchemeUnsupported,
)
from omniserve.quantize.options import QuantizeOptions
from omniserve.quantize.run import prepare, quantize


def options(model: Path, output: Path, **kwargs: Any) -> QuantizeOptions:
    return QuantizeOptions(model=model, output=output, **{"method": "gptq", "progress": False, **kwargs})


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


def test_unknown_method(tiny_qwen2: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidQuantizeOption, match="unknown method 'int3'; choose one of gptq, awq, fp8, fp8-static"):
        prepare(options(tiny_qwen2, tmp_path / "out", method="int3"))


def test_unknown_scheme_lists_the_recipes_schemes(tiny_qwen2: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidQuantizeOption, match="unknown scheme 'W3A3' for method 'gptq'; choose one of W4A16,"):
        prepare(options(tiny_qwen2, tmp_path / "out", scheme="W3A3"))


def test_folder_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotACheckpoint, match=r"no config\.json"):
        prepare(options(tmp_path / "empty", tmp_path / "out"))


def test_config_without_weights_is_not_a_checkpoint(tiny_qwen2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_qwen2 / "config.json", folder)
    with pytest.raises(NotACheckpoint, match="no weights"):
        prepare(options(folder, tmp_path / "out"))


def test_already_quantized_checkpoint_is_refused(tiny_qwen2: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fake-gptq"
    shutil.copytree(tiny_qwen2, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlreadyQuantized, match=r"already quantized .*quant_method='gptq'"):
        prepare(options(folder, tmp_path / "out"))


def test_existing_output_needs_overwrite(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(OutputExists, match="pass --overwrite"):
        prepare(options(tiny_qwen2, out))
    assert (out / "precious.txt").read_text() == "mine"


def test_overwrite_replaces_an_existing_output_and_leaves_nothing_beside_it(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    quantize(options(tiny_qwen2, out, method="fp8", overwrite=True))
    assert not (out / "old.txt").exists()
    assert (out / "quantization_report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .old or .partial folder left


def test_output_inside_the_model_folder_is_refused(tiny_qwen2: Path) -> None:
    with pytest.raises(InvalidQuantizeOption, match="outside the model folder"):
        prepare(options(tiny_qwen2, tiny_qwen2 / "q", overwrite=True))


def test_not_enough_disk_is_refused_up_front(tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cannot be made for real here: shutil.disk_usage reports 1 MiB free."""
    from omniserve.quantize import checkpoint

    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    with pytest.raises(NotEnoughDisk, match=r"needs up to .* MiB .* 1\.0 MiB is free"):
        prepare(options(tiny_qwen2, tmp_path / "out"))


def test_disk_filling_up_while_saving_leaves_no_output(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC mid-save (simulated: the saver raises it) gives NotEnoughDisk, and neither output nor staging stays."""
    from omniserve.quantize import run

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "_save", full)
    with pytest.raises(NotEnoughDisk, match="disk filled up"):
        quantize(options(tiny_qwen2, tmp_path / "out", method="fp8"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["", "  "], "holds no samples"),
        ([chat("hi"), chat("ok"), "{not json"], r":3: not valid JSON"),
        ([chat("hi"), {"messages": [{"role": "robot", "content": "x"}]}], r":2: messages are not OpenAI chat messages"),
        ([{"prompt": "hi"}], r":1: each line must be a JSON object with a \"messages\" list"),
        ([{"messages": []}], r":1: messages is empty"),
    ],
)
def test_calibration_file_problems_name_the_line(tiny_qwen2: Path, tmp_path: Path, rows: list[Any], match: str) -> None:
    data = write_jsonl(tmp_path / "calib.jsonl", rows)
    with pytest.raises(CalibrationDataError, match=match):
        prepare(options(tiny_qwen2, tmp_path / "out", calibration=data))


@pytest.mark.parametrize(
    ("part", "match"),
    [
        ({"type": "image_url", "image_url": {"url": "broken.png"}}, r"calib.jsonl:2: .*(image|decode)"),
        ({"type": "image_url", "image_url": {"url": "missing.png"}}, r"calib.jsonl:2: cannot read .*missing.png"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, r":2: .*files or data: URLs"),
        ({"type": "input_audio", "input_audio": {"data": "%%%not-base64", "format": "wav"}}, r":2: not valid base64"),
    ],
)
def test_undecodable_calibration_media_names_the_line(
    tiny_omni: Path, tmp_path: Path, part: dict[str, Any], match: str
) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    data = write_jsonl(tmp_path / "calib.jsonl", [chat("first"), chat([part, {"type": "text", "text": "?"}])])
    with pytest.raises(CalibrationDataError, match=match):
        quantize(options(tiny_omni, tmp_path / "out", calibration=data, num_samples=2, fidelity_samples=0))
    assert not (tmp_path / "out").exists()


def test_calibration_without_a_readable_sample(tiny_qwen2: Path, tmp_path: Path) -> None:
    png = base64.b64encode(b"never decoded: the model takes no images").decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    data = write_jsonl(tmp_path / "calib.jsonl", [chat([image, {"type": "text", "text": "?"}])])
    with pytest.raises(CalibrationDataError, match=r"no sample this model can read .*1 image"):
        quantize(options(tiny_qwen2, tmp_path / "out", calibration=data))


def test_scheme_the_machine_cannot_run_says_which_and_why(tiny_qwen2: Path, tmp_path: Path) -> None:
    """NVFP4A16 dequantizes to bfloat16 and then fails against float32 activations on this CPU build."""
    from omniserve.quantize.recipes import recipes_dir

    recipe = (recipes_dir() / "fp8.yaml").read_text().replace("scheme: FP8_DYNAMIC", "scheme: NVFP4A16")
    recipe = recipe.replace("schemes:\n", "schemes:\n  NVFP4A16: fp4 weights (for this test)\n")
    path = tmp_path / "fp4.yaml"
    path.write_text(recipe)
    with pytest.raises(SchemeUnsupported, match=r"scheme NVFP4A16 cannot run on this machine \(cpu, float32 weights\)"):
        quantize(options(tiny_qwen2, tmp_path / "out", method="fp8", recipe=path))
    assert not (tmp_path / "out").exists()


def test_awq_cannot_quantize_towers(tiny_omni: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidQuantizeOption, match="--quantize-towers does not work with AWQ"):
        prepare(options(tiny_omni, tmp_path / "out", method="awq", quantize_towers=True))


def test_group_size_that_does_not_divide_tower_widths(tiny_omni: Path, tmp_path: Path) -> None:
    with pytest.raises(
        InvalidQuantizeOption, match=r"groups of 128 .* thinker\.audio_tower\.layers\.0\..* \(32\)"
    ) as info:
        quantize(options(tiny_omni, tmp_path / "out", quantize_towers=True))
    assert not (tmp_path / "out").exists()
    # the advice names only the recipe's schemes that fit: W8A8 is per channel, W8A16 is group-wise too
    assert str(info.value).endswith("(--scheme W8A8)")
    with pytest.raises(InvalidQuantizeOption, match="groups of 128") as info:
        quantize(options(tiny_omni, tmp_path / "out", quantize_towers=True, scheme="W8A16"))
    assert "--scheme W8A16" not in str(info.value), "never advise the scheme that was just refused"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace("GPTQModifier:", "SparseGPTModifier:"), "unknown modifier 'SparseGPTModifier'"),
        (lambda t: t.replace("block_size: 128", "scheme: W8A8"), r"\['scheme'\] are set by omniserve"),
        (lambda t: t.replace("method: gptq", "method: awq"), "is a recipe for method 'awq', not 'gptq'"),
        (lambda t: t.replace("scheme: W4A16\n", "scheme: W4A4\n"), "default scheme 'W4A4' is not listed"),
        (lambda t: t.replace("block_size: 128", "block_sise: 128"), "do not accept scheme"),
        (lambda t: t + "\n  - [unclosed", "not valid YAML"),
    ],
)
def test_broken_recipe(tiny_qwen2: Path, tmp_path: Path, edit: Any, match: str) -> None:
    from omniserve.quantize.recipes import recipes_dir

    path = tmp_path / "recipe.yaml"
    path.write_text(edit((recipes_dir() / "gptq.yaml").read_text()))
    with pytest.raises(RecipeError, match=match):
        prepare(options(tiny_qwen2, tmp_path / "out", recipe=path))


def test_cli_reports_errors_in_one_line_with_exit_codes(tiny_qwen2: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from omniserve.quantize.cli import quantize as command

    app = typer.Typer()
    app.command()(command)
    app.command("unused")(lambda: None)  # two commands: typer keeps the subcommand name
    runner = CliRunner()
    bad_method = runner.invoke(
        app, ["quantize", "--model", str(tiny_qwen2), "--method", "int3", "--output", str(tmp_path / "o")]
    )
    assert bad_method.exit_code == 2
    assert "error: unknown method 'int3'" in bad_method.output
    not_checkpoint = runner.invoke(
        app, ["quantize", "--model", str(tmp_path), "--method", "fp8", "--output", str(tmp_path / "o")]
    )
    assert not_checkpoint.exit_code == 1
    assert "is not a checkpoint folder (no config.json)" in not_checkpoint.output
