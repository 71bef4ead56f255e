"""Options are declared once, as pydantic fields: the flags, their defaults and their checks come from there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from omniserve.config import DeployOptions, EngineOptions, MediaLimits, ServerConfig
from omniserve.flags import OptionError, flags_of, options_command, parse_argv


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: float = Field(2.0, gt=0, description="A rate.")
    hidden: int = Field(7, description="Config file only.", json_schema_extra={"cli": False})


class Toy(BaseModel):
    """A command's options, using every way a field can appear on the command line."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Required.")
    count: int = Field(3, ge=0, description="A count.")
    keys: tuple[str, ...] = Field((), description="Keys.", json_schema_extra={"flag": "key"})
    levels: list[int] = Field(default_factory=lambda: [1], description="Levels.", json_schema_extra={"csv": True})
    args: dict[str, str] = Field(default_factory=dict, description="Args.", json_schema_extra={"flag": "arg"})
    verbose: bool = Field(True, description="Talk.")
    inner: Inner = Field(default_factory=Inner)


def toy_app() -> tuple[typer.Typer, list[Toy]]:
    seen: list[Toy] = []
    app = typer.Typer()

    @options_command(Toy, config_file=True)
    def run(options: Toy) -> None:
        seen.append(options)

    app.command()(run)
    app.command("other")(lambda: None)  # two commands, so `run` is a subcommand as in omniserve
    return app, seen


def test_every_field_is_a_flag_with_the_fields_default_and_help() -> None:
    flags = {flag.option: flag for flag in flags_of(Toy)}
    assert set(flags) == {"--name", "--count", "--key", "--levels", "--arg", "--verbose", "--rate"}
    assert flags["--count"].default == 3 and flags["--count"].help == "A count."
    assert flags["--rate"].path == ("inner", "rate")
    # the deploy command's defaults are the config models' own, not copies
    deploy = {flag.option: flag for flag in flags_of(DeployOptions)}
    assert deploy["--max-queue"].default == EngineOptions().max_queue
    assert deploy["--video-fps"].default == MediaLimits().video_fps
    assert deploy["--max-request-bytes"].default == ServerConfig().max_request_bytes
    assert deploy["--media-fetch-timeout"].path == ("server", "media", "fetch_timeout_seconds")


def test_flags_reach_the_model_in_its_own_shape(tmp_path: Path) -> None:
    app, seen = toy_app()
    argv = ["run", "--name", "a", "--key", "k1", "--key", "k2", "--levels", "4,16", "--levels", "64"]
    argv += ["--arg", "x=1", "--arg", "y = two", "--no-verbose", "--rate", "0.5"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert options == Toy(
        name="a", keys=("k1", "k2"), levels=[4, 16, 64], args={"x": "1", "y": "two"}, verbose=False, inner={"rate": 0.5}
    )


def test_flags_left_out_keep_the_config_files_values(tmp_path: Path) -> None:
    config = tmp_path / "toy.yaml"
    config.write_text("name: from-file\ncount: 9\ninner:\n  rate: 4.0\n  hidden: 1\n")
    app, seen = toy_app()
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--count", "5"])
    assert result.exit_code == 0, result.output
    assert seen[0].name == "from-file" and seen[0].count == 5  # the flag wins over the file
    assert seen[0].inner == Inner(rate=4.0, hidden=1)  # a field that is no flag is still settable in a file


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        (
            ["--name", "a", "--count", "-1"],
            None,
            "error: invalid option: --count: Input should be greater than or equal to 0",
        ),
        (["--name", "a", "--rate", "0"], None, "error: invalid option: --rate: Input should be greater than 0"),
        ([], None, "error: invalid option: --name: field required"),
        (["--arg", "novalue"], None, "error: --arg: expected KEY=VALUE, got 'novalue'"),
        (["--name", "a", "--levels", "1,x"], None, "error: invalid option: --levels: Input should be a valid integer"),
        ([], "name: a\ncolour: red\n", "error: invalid option: colour: Extra inputs are not permitted"),
        ([], "- a list\n", "expected a mapping of option names to values"),
        ([], "name: [unclosed\n", "not valid YAML or JSON"),
    ],
)
def test_refusals_name_the_flag_and_exit_2(argv: list[str], config: str | None, message: str, tmp_path: Path) -> None:
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    app, seen = toy_app()
    result = CliRunner().invoke(app, ["run", *argv])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not seen


def test_deploy_options_refuse_meaningless_combinations_everywhere() -> None:
    """One check serves deploy, its --config file, --print-k8s and eval's --deploy-arg."""
    with pytest.raises(OptionError, match="--gate compares a quantized model with its original: it needs --quant"):
        parse_argv(DeployOptions, ["--gate", "omni-synth"], what="deploy")
    with pytest.raises(OptionError, match="--force overrides a failed quality gate: it needs --gate"):
        parse_argv(DeployOptions, ["--quant", "awq", "--force"], what="deploy")
    with pytest.raises(OptionError, match="--quantize-only needs --quant"):
        parse_argv(DeployOptions, ["--quantize-only"], what="deploy")
    with pytest.raises(OptionError, match="'int3' is not one of 'gptq', 'awq', 'fp8', 'fp8-static'"):
        parse_argv(DeployOptions, ["--quant", "int3"], what="deploy")
    with pytest.raises(OptionError, match="No such option"):
        parse_argv(DeployOptions, ["--max-qeue", "3"], what="--deploy-arg")


def test_a_deploy_config_file_written_from_options_reads_back_the_same(tmp_path: Path) -> None:
    """How eval and the gate start servers: the options object written as `deploy --config`, never flag strings."""
    options = parse_argv(
        DeployOptions,
        ["--model", str(tmp_path), "--engine-arg", "k=v", "--api-key", "s", "--video-fps", "0.5", "--max-queue", "2"],
        what="deploy",
    )
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps(options.model_dump(mode="json", exclude_defaults=True)))
    assert parse_argv(DeployOptions, ["--config", str(path)], what="deploy") == options
    overridden = parse_argv(DeployOptions, ["--config", str(path), "--max-queue", "5"], what="deploy")
    assert overridden.engine_options.max_queue == 5 and overridden.server.media.video_fps == 0.5


def test_eval_deploy_args_are_read_by_deploys_parser_before_anything_starts(tmp_path: Path) -> None:
    from omniserve.eval.runner import EvalOptions

    options = EvalOptions(
        suites=["text-mcq"], model=tmp_path, quant="gptq", deploy_args=["--dtype=bfloat16", "--max-model-len=512"]
    )
    assert options.server is not None
    assert options.server.model == tmp_path.resolve() and options.server.quant == "gptq"
    assert options.server.engine_options.dtype == "bfloat16" and options.server.engine_options.max_model_len == 512
    with pytest.raises(ValueError, match="--deploy-arg: No such option"):
        EvalOptions(suites=["text-mcq"], model=tmp_path, deploy_args=["--no-such-flag"])
