"""The ``omniserve eval`` (with ``eval compare``) and ``omniserve bench`` commands.

Only typer and the standard library are imported at module level: EvalScope, matplotlib and the
rest load inside the commands, so ``omniserve --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omniserve.cli_errors import exit_on

eval_app = typer.Typer(
    help="Score a model on offline suites through EvalScope; `eval compare` puts runs side by side.",
    invoke_without_command=True,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
)


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options also accept comma-separated lists (``--suite a,b``)."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


@eval_app.callback()
def eval_command(
    ctx: typer.Context,
    suite: Annotated[
        list[str] | None, typer.Option(help="Suite name (see eval/) or suite YAML file; repeatable or a,b,c.")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Checkpoint to serve on a free loopback port for the run.")] = None,
    url: Annotated[str | None, typer.Option(help="Score an already running OpenAI-compatible server (…/v1).")] = None,
    limit: Annotated[int | None, typer.Option(help="Items per subset (default: all).")] = None,
    output: Annotated[Path | None, typer.Option(help="Run folder. Default: ./omniserve-eval/<model>-<time>.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Key for --url servers that need one.")] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="With --url: the model id to ask for (default: the first listed).")
    ] = None,
    engine: Annotated[str, typer.Option(help="With --model: inference engine.")] = "transformers",
    quant: Annotated[str | None, typer.Option(help="With --model: quantize first, as deploy --quant does.")] = None,
    quant_cache_dir: Annotated[Path | None, typer.Option(help="With --quant: its cache folder.")] = None,
    deploy_arg: Annotated[
        list[str] | None,
        typer.Option(help="With --model: extra `omniserve deploy` flag, e.g. --deploy-arg=--dtype=bfloat16."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Eval cache (generated data, EvalScope/HF caches). Default: ~/.cache/omniserve/eval."),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 4,
    request_timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 300,
    progress: Annotated[bool, typer.Option(help="Show live progress.")] = True,
) -> None:
    """Run suites against --model (a server started for the run) or --url (a running server)."""
    if ctx.invoked_subcommand is not None:
        return
    from pydantic import ValidationError

    from omniserve.eval.errors import EvalError
    from omniserve.eval.progress import SuiteProgress
    from omniserve.eval.runner import EvalOptions, run_evaluation

    suites = _split(suite)
    if not suites:
        typer.echo("error: give at least one --suite (e.g. --suite text-mcq,omni-synth)", err=True)
        raise typer.Exit(2)
    try:
        options = EvalOptions(
            suites=suites,
            model=model,
            url=url,
            output=output,
            limit=limit,
            api_key=api_key,
            served_model_name=served_model_name,
            engine=engine,
            quant=quant,
            quant_cache_dir=quant_cache_dir,
            deploy_args=list(deploy_arg or []),
            cache_dir=cache_dir,
            concurrency=concurrency,
            request_timeout=request_timeout,
        )
    except ValidationError as exc:
        typer.echo(f"error: invalid option: {_first_error(exc)}", err=True)
        raise typer.Exit(2) from None
    with exit_on(EvalError):
        report = run_evaluation(options, progress=SuiteProgress(enabled=progress))
    typer.echo(report.markdown())
    typer.echo(f"report: {Path(report.options['output']) / 'report.json'}")
    if not report.complete:
        typer.echo("error: the run is incomplete (see the errors above); partial scores were kept", err=True)
        raise typer.Exit(1)


@eval_app.command("compare")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with report.json); the first is the baseline.")],
    output: Annotated[
        Path | None, typer.Option(help="Folder for compare.json/.md/.png. Default: ./omniserve-compare.")
    ] = None,
) -> None:
    """Put runs side by side (e.g. bf16 vs awq vs gptq vs fp8): table, retention per suite, PNG plot."""
    from omniserve.eval.compare import compare_runs
    from omniserve.eval.errors import EvalError

    with exit_on(EvalError):
        comparison = compare_runs(runs, output or Path("omniserve-compare"))
    typer.echo(comparison.markdown())
    typer.echo(f"plot: {comparison.plot}")


def bench_command(
    url: Annotated[str | None, typer.Option(help="A running OpenAI-compatible server (…/v1).")] = None,
    model: Annotated[Path | None, typer.Option(help="Checkpoint to serve on a free loopback port for the run.")] = None,
    concurrency: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="Requests per concurrency level.")] = 32,
    dataset: Annotated[
        str, typer.Option(help="synthetic (generated prompts) or a JSONL FILE: lines with 'question' or 'messages'.")
    ] = "synthetic",
    media: Annotated[
        str, typer.Option(help="With --dataset synthetic: none | image | audio | image+audio in every request.")
    ] = "none",
    stream: Annotated[bool, typer.Option(help="Stream replies (needed for TTFT/ITL).")] = True,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            help="Generate exactly --max-tokens per reply (sends ignore_eos, as vLLM/SGLang accept); "
            "--no-ignore-eos for servers that refuse the field, replies then stop at the model's end."
        ),
    ] = True,
    output: Annotated[
        Path | None, typer.Option(help="Folder for bench.json/.md/.png. Default: ./omniserve-bench/<time>.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Key for --url servers that need one.")] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="With --url: the model id (default: first listed).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Local tokenizer folder for token counts (default: --model's; never a hub id).")
    ] = None,
    engine: Annotated[str, typer.Option(help="With --model: inference engine.")] = "transformers",
    quant: Annotated[str | None, typer.Option(help="With --model: quantize first, as deploy --quant does.")] = None,
    quant_cache_dir: Annotated[Path | None, typer.Option(help="With --quant: its cache folder.")] = None,
    deploy_arg: Annotated[list[str] | None, typer.Option(help="With --model: extra `omniserve deploy` flag.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Eval cache (EvalScope/HF caches).")] = None,
) -> None:
    """Load-test a server with EvalScope's perf tool: TTFT, TPOT, ITL, req/s, tok/s per concurrency level."""
    from pydantic import ValidationError

    from omniserve.eval.bench import BenchOptions, run_bench
    from omniserve.eval.errors import EvalError

    try:
        levels = [int(v) for v in _split([concurrency])]
    except ValueError:
        typer.echo(f"error: --concurrency must be integers like 1,4,16, got {concurrency!r}", err=True)
        raise typer.Exit(2) from None
    try:
        options = BenchOptions(
            url=url,
            model=model,
            concurrency=levels,
            requests=requests,
            dataset=dataset,
            media=media,
            stream=stream,
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            output=output,
            api_key=api_key,
            served_model_name=served_model_name,
            tokenizer=tokenizer,
            engine=engine,
            quant=quant,
            quant_cache_dir=quant_cache_dir,
            deploy_args=list(deploy_arg or []),
            cache_dir=cache_dir,
        )
    except ValidationError as exc:
        typer.echo(f"error: invalid option: {_first_error(exc)}", err=True)
        raise typer.Exit(2) from None
    with exit_on(EvalError):
        report = run_bench(options)
    typer.echo(report.markdown())
    typer.echo(f"results: {report.folder / 'bench.json'}; chart: {report.folder / 'bench.png'}")


def _first_error(exc: object) -> str:
    errors = exc.errors()  # type: ignore[attr-defined]
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])
