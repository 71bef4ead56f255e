"""The ``omniserve quantize`` command, its flags being ``QuantizeOptions``; only light imports at module level."""

from __future__ import annotations

import typer

from omniserve.cli_errors import exit_on
from omniserve.extras import QUANTIZE_MODULES, MissingExtra, require_extra
from omniserve.flags import options_command
from omniserve.logs import configure_logging
from omniserve.quantize.errors import QuantizeError
from omniserve.quantize.options import QuantizeOptions


@options_command(QuantizeOptions)
def quantize(options: QuantizeOptions) -> None:
    """Quantize a checkpoint (GPTQ, AWQ, FP8) into a compressed-tensors folder with a verification report."""
    from omniserve.quantize.run import execute, prepare

    configure_logging(options.log_level)
    with exit_on(QuantizeError, MissingExtra):
        require_extra("quantize", QUANTIZE_MODULES)  # before anything else: the whole command is llm-compressor
        plan = prepare(options)  # every file-level check first: a bad flag costs milliseconds, not a model load
        result = execute(plan)
    typer.echo(result.report.table())
    typer.echo(str(result.output))
