"""The ``omniserve eval`` (with ``eval compare``) and ``omniserve bench`` commands.

Their flags are the fields of ``EvalOptions`` and ``BenchOptions`` (``omniserve.flags``). Only
typer, pydantic and the standard library are imported at module level: EvalScope, matplotlib and
the rest load inside the commands, so ``omniserve --help`` stays instant.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from omniserve.cli_errors import exit_on
from omniserve.eval.bench import BenchOptions
from omniserve.eval.errors import EvalError
from omniserve.eval.runner import EvalOptions
from omniserve.flags import options_command
from omniserve.paths import Folders

Run = TypeVar("Run", EvalOptions, BenchOptions)

eval_app = typer.Typer(
    help="Score a model on offline suites through EvalScope; `eval compare` puts runs side by side.",
    invoke_without_command=True,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
)


def with_default_cache(options: Run) -> Run:
    """The options with the eval cache filled in (``Folders.eval``) when no ``--cache-dir`` was given."""
    if options.cache_dir is not None:
        return options
    return options.model_copy(update={"cache_dir": Folders.from_environment(os.environ, Path.home()).eval})


@options_command(EvalOptions)
def eval_command(options: EvalOptions) -> None:
    """Run suites against --model (a server started for the run) or --url (a running server)."""
    from omniserve.eval.progress import SuiteProgress
    from omniserve.eval.runner import run_evaluation

    with exit_on(EvalError):
        report = run_evaluation(with_default_cache(options), progress=SuiteProgress(enabled=options.progress))
    typer.echo(report.markdown())
    typer.echo(f"report: {Path(report.options['output']) / 'report.json'}")
    if not report.complete:
        typer.echo("error: the run is incomplete (see the errors above); partial scores were kept", err=True)
        raise typer.Exit(1)


def _list_suites(value: bool) -> None:
    """``--list-suites``: print the built-in suites and EvalScope's standard benchmarks, then stop."""
    if not value:
        return
    from omniserve.eval.standard import listing
    from omniserve.eval.suites import builtin_suites, load_suite

    builtin = []
    for name in builtin_suites():
        suite = load_suite(name)
        builtin.append((name, suite.format, suite.scoring))
    typer.echo(listing(builtin))
    raise typer.Exit(0)


def _with_list_suites(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with an eager ``--list-suites`` flag, which needs neither a suite nor a server."""
    signature = inspect.signature(command)
    flag = typer.Option(
        "--list-suites", is_eager=True, callback=_list_suites, help="List built-in suites and standard benchmarks."
    )
    extra = inspect.Parameter(
        "list_suites", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, flag]
    )
    vars(command)["__signature__"] = signature.replace(parameters=[*signature.parameters.values(), extra])
    return command


eval_app.callback()(_with_list_suites(eval_command))


@eval_app.command("compare")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with report.json); the first is the baseline.")],
    output: Annotated[
        Path | None, typer.Option(help="Folder for compare.json/.md/.png. Default: ./omniserve-compare.")
    ] = None,
) -> None:
    """Put runs side by side (e.g. bf16 vs awq vs gptq vs fp8): table, retention per suite, PNG plot."""
    from omniserve.eval.compare import COMPARE_HTML, compare_runs

    with exit_on(EvalError):
        comparison = compare_runs(runs, output or Path("omniserve-compare"))
    typer.echo(comparison.markdown())
    typer.echo(f"plot: {comparison.plot}; page: {comparison.plot.with_name(COMPARE_HTML)}")


@options_command(BenchOptions)
def bench_command(options: BenchOptions) -> None:
    """Load-test a server with EvalScope's perf tool: TTFT, TPOT, ITL, req/s, tok/s per concurrency level."""
    from omniserve.eval.bench import run_bench

    with exit_on(EvalError):
        report = run_bench(with_default_cache(options))
    typer.echo(report.markdown())
    typer.echo(
        f"results: {report.folder / 'bench.json'}; chart: {report.folder / 'bench.png'}; "
        f"page: {report.folder / 'bench.html'}"
    )
