"""The ``omniserve`` command. Heavy libraries are imported inside commands so ``--help`` is instant."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from omniserve.cli_errors import exit_on
from omniserve.config import EngineConfig, MediaLimits, ServerConfig

app = typer.Typer(
    help="Serve, quantize, evaluate and ship multimodal checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _default(model: type, name: str) -> object:
    return model.model_fields[name].default


def _help(model: type, name: str) -> str:
    return f"{model.model_fields[name].description}"


def _parse_engine_args(items: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--engine-arg")
        parsed[key.strip()] = value.strip()
    return parsed


@app.command()
def deploy(
    model: Annotated[
        Path | None, typer.Option(help="Checkpoint folder. Default: the built-in demo omni model.")
    ] = None,
    engine: Annotated[str, typer.Option(help="Inference engine.")] = "transformers",
    host: Annotated[str, typer.Option(help=_help(ServerConfig, "host"))] = "127.0.0.1",
    port: Annotated[int, typer.Option(help=_help(ServerConfig, "port"))] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients use; default: the folder name.")] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="Accepted API key (repeatable). None: no auth.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File with one API key per line.")] = None,
    max_concurrency: Annotated[int, typer.Option(help=_help(EngineConfig, "max_concurrency"))] = 8,
    max_queue: Annotated[int, typer.Option(help=_help(EngineConfig, "max_queue"))] = 64,
    max_model_len: Annotated[int | None, typer.Option(help=_help(EngineConfig, "max_model_len"))] = None,
    max_n: Annotated[int, typer.Option(help=_help(EngineConfig, "max_n"))] = 8,
    dtype: Annotated[str, typer.Option(help=_help(EngineConfig, "dtype"))] = "float32",
    device: Annotated[str, typer.Option(help=_help(EngineConfig, "device"))] = "cpu",
    engine_arg: Annotated[list[str] | None, typer.Option(help="Engine-specific KEY=VALUE (repeatable).")] = None,
    allowed_media_domains: Annotated[
        list[str] | None, typer.Option(help=_help(MediaLimits, "allowed_media_domains"))
    ] = None,
    allow_private_media_addresses: Annotated[
        bool, typer.Option(help=_help(MediaLimits, "allow_private_media_addresses"))
    ] = False,
    allowed_local_media_path: Annotated[
        Path | None, typer.Option(help=_help(MediaLimits, "allowed_local_media_path"))
    ] = None,
    max_media_bytes: Annotated[int, typer.Option(help=_help(MediaLimits, "max_media_bytes"))] = _default(
        MediaLimits, "max_media_bytes"
    ),  # type: ignore[assignment]
    max_image_pixels: Annotated[int, typer.Option(help=_help(MediaLimits, "max_image_pixels"))] = _default(
        MediaLimits, "max_image_pixels"
    ),  # type: ignore[assignment]
    video_fps: Annotated[float, typer.Option(help=_help(MediaLimits, "video_fps"))] = _default(
        MediaLimits, "video_fps"
    ),  # type: ignore[assignment]
    max_video_frames: Annotated[int, typer.Option(help=_help(MediaLimits, "max_video_frames"))] = _default(
        MediaLimits, "max_video_frames"
    ),  # type: ignore[assignment]
    max_video_seconds: Annotated[float, typer.Option(help=_help(MediaLimits, "max_video_seconds"))] = _default(
        MediaLimits, "max_video_seconds"
    ),  # type: ignore[assignment]
    max_audio_seconds: Annotated[float, typer.Option(help=_help(MediaLimits, "max_audio_seconds"))] = _default(
        MediaLimits, "max_audio_seconds"
    ),  # type: ignore[assignment]
    media_fetch_timeout: Annotated[float, typer.Option(help=_help(MediaLimits, "fetch_timeout_seconds"))] = _default(
        MediaLimits, "fetch_timeout_seconds"
    ),  # type: ignore[assignment]
    max_request_bytes: Annotated[int, typer.Option(help=_help(ServerConfig, "max_request_bytes"))] = _default(
        ServerConfig, "max_request_bytes"
    ),  # type: ignore[assignment]
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allowed CORS origin (repeatable).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    quant: Annotated[
        str | None,
        typer.Option(
            help="Quantize first (gptq | awq | fp8 | fp8-static) into --quant-cache-dir and serve the "
            "cached result; a checkpoint that is already quantized is served as is."
        ),
    ] = None,
    quant_cache_dir: Annotated[
        Path | None, typer.Option(help="Cache for --quant. Default: ~/.cache/omniserve/quantized.")
    ] = None,
    quantize_only: Annotated[
        bool, typer.Option(help="With --quant: fill the cache, print the quantized folder and exit (an init step).")
    ] = False,
    gate: Annotated[
        str | None,
        typer.Option(
            help="With --quant: score the quantized model against the original on this eval suite "
            "(SUITE or SUITE:MAX_DROP, points, default drop 2) and refuse to serve it (exit 3) when it loses "
            "more. Scores are cached with the quantized checkpoint, so the gate runs once."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="With --gate: serve the quantized model even when the gate fails (a warning).")
    ] = False,
    print_k8s: Annotated[
        bool, typer.Option(help="Print Helm values for helm/omniserve equivalent to this command, then exit.")
    ] = False,
) -> None:
    """Serve a checkpoint behind an OpenAI-compatible API."""
    from pydantic import ValidationError

    from omniserve.errors import ModelLoadError
    from omniserve.server.auth import read_key_file

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = list(api_key or [])
    if api_key_file is not None:
        keys.extend(read_key_file(api_key_file))
    try:
        # --print-k8s only describes the command: the built-in model is built by the pod, not here
        model_path = model if model is not None else (Path("builtin") if print_k8s else _builtin_model())
        source_name = model_path.resolve().name
        _check_gate_flags(quant, gate, force)
        if quant is not None and not print_k8s:
            original = model_path
            model_path = _quantized(model_path, quant, quant_cache_dir)
            if gate is not None:
                deploy_args = [f"--dtype={dtype}", f"--device={device}"]
                deploy_args += [f"--engine-arg={item}" for item in engine_arg or []]
                if max_model_len is not None:
                    deploy_args.append(f"--max-model-len={max_model_len}")
                _gate(original, model_path, gate, force, engine, deploy_args)
            if quantize_only:
                typer.echo(str(model_path))
                raise typer.Exit(0)
        elif quantize_only:
            typer.echo("error: --quantize-only needs --quant", err=True)
            raise typer.Exit(2)
        media = MediaLimits(
            max_media_bytes=max_media_bytes,
            max_image_pixels=max_image_pixels,
            video_fps=video_fps,
            max_video_frames=max_video_frames,
            max_video_seconds=max_video_seconds,
            max_audio_seconds=max_audio_seconds,
            allowed_media_domains=tuple(allowed_media_domains) if allowed_media_domains else None,
            allow_private_media_addresses=allow_private_media_addresses,
            allowed_local_media_path=allowed_local_media_path.resolve() if allowed_local_media_path else None,
            fetch_timeout_seconds=media_fetch_timeout,
        )
        server_config = ServerConfig(
            host=host,
            port=port,
            api_keys=tuple(keys),
            max_request_bytes=max_request_bytes,
            cors_origins=tuple(cors_origin or ()),
            media=media,
        )
        engine_config = EngineConfig(
            model=model_path.resolve(),
            # clients see the model's own name, not the quantization cache entry's
            served_model_name=served_model_name or source_name,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            max_model_len=max_model_len,
            max_n=max_n,
            dtype=dtype,
            device=device,
            engine_args=_parse_engine_args(engine_arg or []),
        )
    except ValidationError as exc:
        typer.echo(f"error: invalid option: {exc}", err=True)
        raise typer.Exit(2) from None
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if print_k8s:
        from omniserve.k8s_values import dump_values_yaml, values_from_deploy

        try:
            values = values_from_deploy(
                engine_config,
                server_config,
                engine=engine,
                quant=quant,
                gate=gate,
                force=force,
                log_level=log_level,
                builtin_model=model is None,
            )
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(dump_values_yaml(values), nl=False)
        raise typer.Exit(0)
    code = serve(engine, engine_config, server_config, log_level)
    raise typer.Exit(code)


def _quantized(model: Path, quant: str, cache_dir: Path | None) -> Path:
    from omniserve.quantize.cli import model_for_deploy
    from omniserve.quantize.errors import QuantizeError

    with exit_on(QuantizeError):
        return model_for_deploy(model, quant, cache_dir)


def _check_gate_flags(quant: str | None, gate: str | None, force: bool) -> None:
    """Refuse meaningless combinations, and a bad gate suite, before minutes of quantizing."""
    from omniserve.eval.errors import EvalError

    if gate is not None and quant is None:
        typer.echo("error: --gate compares a quantized model with its original: it needs --quant", err=True)
        raise typer.Exit(2)
    if force and gate is None:
        typer.echo("error: --force overrides a failed quality gate: it needs --gate", err=True)
        raise typer.Exit(2)
    if gate is None:
        return
    from omniserve.eval.gate import parse_gate_spec
    from omniserve.eval.suites import load_suite
    from omniserve.eval.worker import require_eval_extra

    with exit_on(EvalError):
        require_eval_extra()
        load_suite(parse_gate_spec(gate).suite)


def _gate(original: Path, quantized: Path, spec: str, force: bool, engine: str, deploy_args: list[str]) -> None:
    from omniserve.eval.errors import EvalError
    from omniserve.eval.gate import gate_or_refuse

    typer.echo(f"quality gate: scoring {quantized} against {original} on {spec} (once; cached after)", err=True)
    with exit_on(EvalError):
        result = gate_or_refuse(original, quantized, spec, force, engine=engine, deploy_args=deploy_args)
    typer.echo(result.summary(), err=True)


def _builtin_model() -> Path:
    from omniserve.models.demo import demo_model_path

    typer.echo(
        "no --model given: serving the built-in demo model (tiny Qwen2.5-Omni trained on omniserve synth)", err=True
    )
    return demo_model_path()


def serve(engine_name: str, engine_config: EngineConfig, server_config: ServerConfig, log_level: str) -> int:
    """Run the server until interrupted; return the process exit code."""
    import uvicorn

    from omniserve.engines.registry import create_engine
    from omniserve.errors import ModelLoadError
    from omniserve.server.app import build_app

    if not (engine_config.model / "config.json").is_file():
        typer.echo(f"error: {engine_config.model} is not a checkpoint folder (no config.json)", err=True)
        return 1
    busy = _port_problem(server_config.host, server_config.port)
    if busy:  # say so before spending minutes loading a model; never move to another port
        typer.echo(f"error: cannot listen on {server_config.host}:{server_config.port}: {busy}", err=True)
        return 1
    try:
        engine = create_engine(engine_name, engine_config)
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    app_ = build_app(engine, engine_config, server_config)
    config = uvicorn.Config(
        app_,
        host=server_config.host,
        port=server_config.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits with its own code (3) when the app fails to start; a model that did not load is
        # exit 1 like every other load failure (3 means a refused quality gate), and it was reported
        if getattr(app_.state, "start_failure", None) is None:
            raise
        return 1
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
