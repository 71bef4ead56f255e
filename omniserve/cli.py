"""The ``omniserve`` command. Heavy libraries are imported inside commands so ``--help`` is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from omniserve.cli_errors import exit_on
from omniserve.config import DeployOptions, EngineConfig, ServerConfig
from omniserve.flags import OptionError, options_command
from omniserve.logs import configure_logging
from omniserve.models.demo import builtin_model, builtin_name, builtin_served_name
from omniserve.models.describe import ModelsOptions
from omniserve.paths import Folders

app = typer.Typer(
    help="Serve, quantize, evaluate and ship multimodal checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def folders_from_environment() -> Folders:
    """omniserve's cache folders, from ``XDG_CACHE_HOME``: only the command line reads the environment."""
    return Folders.from_environment(os.environ, Path.home())


@options_command(DeployOptions, config_file=True)
def deploy(options: DeployOptions) -> None:
    """Serve a checkpoint behind an OpenAI-compatible API."""
    from omniserve.errors import ModelLoadError
    from omniserve.eval.errors import EvalError
    from omniserve.quantize.errors import QuantizeError

    configure_logging(options.log_level)
    with exit_on(ModelLoadError, QuantizeError, EvalError, OptionError):
        options = _with_key_file(options)
        if options.print_k8s:  # describes the command: the built-in model is built by the pod, not here
            from omniserve.k8s_values import dump_values_yaml, values_from_deploy

            typer.echo(dump_values_yaml(values_from_deploy(options)), nl=False)
            raise typer.Exit(0)
        model = prepared_checkpoint(options, folders_from_environment())
        if options.quantize_only:
            typer.echo(str(model))
            raise typer.Exit(0)
    raise typer.Exit(serve(options.engine, engine_config(options, model), options.server, options.log_level))


def _with_key_file(options: DeployOptions) -> DeployOptions:
    """The options with ``--api-key-file``'s keys added to ``--api-key``'s."""
    if options.api_key_file is None:
        return options
    from omniserve.server.auth import read_key_file

    keys = (*options.server.api_keys, *read_key_file(options.api_key_file))
    return options.model_copy(update={"server": options.server.model_copy(update={"api_keys": keys})})


def prepared_checkpoint(options: DeployOptions, folders: Folders) -> Path:
    """The folder to serve: the given (or built-in) model, or its quantized copy once it passed the gate."""
    from omniserve.eval.gate import check_gate_spec, gate_or_refuse

    if options.gate is not None:  # a bad suite or a missing eval extra fails in a second, before quantizing
        check_gate_spec(options.gate, dataset_dir=options.gate_dataset_dir)
    model = _model_folder(options.model, folders)
    if options.quant is None:
        return model
    from omniserve.quantize.cache import ensure_quantized

    quantized = ensure_quantized(model, options.quant, cache_dir=options.quant_cache_dir or folders.quantized)
    if options.gate is not None:
        typer.echo(
            f"quality gate: scoring {quantized} against {model} on {options.gate} (once; cached after)", err=True
        )
        result = gate_or_refuse(model, quantized, options.gate, options.force, server=options, cache_dir=folders.eval)
        typer.echo(result.summary(), err=True)
    return quantized


def engine_config(options: DeployOptions, model: Path) -> EngineConfig:
    """What the engine is created with; clients see the model's own name, not a quantization cache entry's."""
    from omniserve.lora.serving import serves_lora

    source = options.model if options.model is not None else model
    builtin = builtin_name(options.model)
    served = builtin_served_name(builtin) if builtin is not None else source.resolve().name
    engine_options = options.engine_options.model_dump()
    # vLLM reserves LoRA slots only when told at start: whenever adapters may be served at all
    engine_options["enable_lora"] = engine_options["enable_lora"] or serves_lora(options.server)
    return EngineConfig(
        model=model.resolve(),
        served_model_name=options.served_model_name or served,
        **engine_options,
    )


def _model_folder(model: Path | None, folders: Folders) -> Path:
    """``--model``'s folder; a built-in model (none given, or ``builtin:NAME``) is shipped or built on first use."""
    if model is not None and builtin_name(model) is None:
        return model
    name = builtin_name(model) or "omni"
    if model is None:
        typer.echo(
            "no --model given: serving the built-in demo model (tiny Qwen2.5-Omni trained on omniserve synth)",
            err=True,
        )
    return builtin_model(name, folders.models)


def serve(engine_name: str, engine_config: EngineConfig, server_config: ServerConfig, log_level: str) -> int:
    """Run the server until interrupted; return the process exit code.

    SIGTERM or SIGINT drains (``server/drain.py``: 503s while the socket stays open for
    ``--drain-delay``, running requests get ``--drain-timeout``) and then exits 0; a second signal
    stops at once.
    """
    import uvicorn

    from omniserve.engines.registry import create_engine
    from omniserve.errors import ModelLoadError
    from omniserve.server.app import build_app
    from omniserve.server.drain import DrainingServer

    if not (engine_config.model / "config.json").is_file():
        typer.echo(f"error: {engine_config.model} is not a checkpoint folder (no config.json)", err=True)
        return 1
    busy = _port_problem(server_config.host, server_config.port)
    if busy:  # say so before spending minutes loading a model; never move to another port
        typer.echo(f"error: cannot listen on {server_config.host}:{server_config.port}: {busy}", err=True)
        return 1
    try:
        engine = create_engine(engine_name, engine_config)
        app_ = build_app(engine, engine_config, server_config)  # opens the responses store: may fail too
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    config = uvicorn.Config(
        app_,
        host=server_config.host,
        port=server_config.port,
        log_level=log_level.lower(),
        lifespan="on",
    )
    server = DrainingServer(config, app_.state.drain)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits with its own code (3) when the app fails to start; a model that did not load is
        # exit 1 like every other load failure (3 means a refused quality gate), and it was reported
        failure = getattr(app_.state, "start_failure", None)
        if failure is None:
            raise
        return int(getattr(failure, "exit_code", 1))  # 2 for a missing extra, 1 for any other load failure
    return 0 if server.started else 1


def _port_problem(host: str, port: int) -> str | None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror.lower() if exc.strerror else str(exc)
    return None


@app.command("build-tiny")
def build_tiny(
    output: Annotated[Path, typer.Option(help="Folder to create (must not exist).")],
    kind: Annotated[str, typer.Option(help="omni | qwen2-vl | qwen2")] = "omni",
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Build a tiny random-weight checkpoint offline (for tests, demos and benchmarks)."""
    from omniserve.models import build_tiny_omni, build_tiny_qwen2, build_tiny_qwen2_vl

    builders = {"omni": build_tiny_omni, "qwen2-vl": build_tiny_qwen2_vl, "qwen2": build_tiny_qwen2}
    if kind not in builders:
        raise typer.BadParameter(f"choose one of {', '.join(builders)}", param_hint="--kind")
    path = builders[kind](output, seed=seed)
    typer.echo(str(path))


app.command("deploy")(deploy)


@options_command(ModelsOptions)
def models(options: ModelsOptions) -> None:
    """Describe a checkpoint folder: family, modalities, engines, training masks, quantization."""
    from omniserve.errors import ModelLoadError
    from omniserve.models.describe import describe

    with exit_on(ModelLoadError):
        found = describe(options.model)
    typer.echo(found.as_json() if options.json_output else "\n".join(found.lines()))


app.command("models")(models)


def _register_siblings() -> None:
    """Commands of the sibling packages; their modules import nothing heavy at module level."""
    from omniserve.eval.cli import bench_command, eval_app
    from omniserve.quantize.cli import quantize
    from omniserve.train.cli import check_parity, synth, synth_eval, train

    app.add_typer(eval_app, name="eval")
    app.command("bench")(bench_command)
    app.command("quantize")(quantize)
    app.command("train")(train)
    app.command("check-parity")(check_parity)
    app.command("synth")(synth)
    app.command("synth-eval")(synth_eval)


_register_siblings()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
