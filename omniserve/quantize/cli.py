"""The ``omniserve quantize`` command and the ``deploy --quant`` hook; only light imports at module level."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from omniserve.cli_errors import exit_on
from omniserve.quantize.errors import QuantizeError
from omniserve.quantize.options import QuantizeOptions


def _help(name: str) -> str:
    return str(QuantizeOptions.model_fields[name].description)


def quantize(
    model: Annotated[Path, typer.Option(help=_help("model"))],
    method: Annotated[str, typer.Option(help=_help("method"))],
    output: Annotated[Path, typer.Option(help=_help("output"))],
    scheme: Annotated[str | None, typer.Option(help=_help("scheme"))] = None,
    recipe: Annotated[Path | None, typer.Option(help=_help("recipe"))] = None,
    calibration: Annotated[Path | None, typer.Option(help=_help("calibration"))] = None,
    num_samples: Annotated[int | None, typer.Option(help=_help("num_samples"))] = None,
    max_length: Annotated[int | None, typer.Option(help=_help("max_length"))] = None,
    fidelity_samples: Annotated[int, typer.Option(help=_help("fidelity_samples"))] = 4,
    quantize_towers: Annotated[bool, typer.Option(help=_help("quantize_towers"))] = False,
    overwrite: Annotated[bool, typer.Option(help=_help("overwrite"))] = False,
    device: Annotated[str, typer.Option(help=_help("device"))] = "auto",
    progress: Annotated[bool, typer.Option(help=_help("progress"))] = True,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Quantize a checkpoint (GPTQ, AWQ, FP8) into a compressed-tensors folder with a verification report."""
    from pydantic import ValidationError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = QuantizeOptions(
            model=model,
            method=method,
            output=output,
            scheme=scheme,
            recipe=recipe,
            calibration=calibration,
            num_samples=num_samples,
            max_length=max_length,
            fidelity_samples=fidelity_samples,
            quantize_towers=quantize_towers,
            overwrite=overwrite,
            device=device,
            progress=progress,
        )
    except ValidationError as exc:
        typer.echo(f"error: invalid option: {exc}", err=True)
        raise typer.Exit(2) from None
    from omniserve.quantize.run import execute, prepare

    with exit_on(QuantizeError):
        plan = prepare(options)  # every file-level check first: a bad flag costs milliseconds, not a model load
        result = execute(plan)
    typer.echo(result.report.table())
    typer.echo(str(result.output))


def model_for_deploy(model: Path, quant: str | None, cache_dir: Path | None) -> Path:
    """The folder ``deploy`` serves: ``model`` itself, or its cached quantized copy (made on first use).

    Raises ``QuantizeError`` (report with ``error: <message>``, exit 1). An already quantized
    ``model`` is served as it is.
    """
    if quant is None:
        return model
    from omniserve.quantize.cache import default_quant_cache_dir, ensure_quantized

    return ensure_quantized(model, quant, cache_dir=cache_dir or default_quant_cache_dir())
