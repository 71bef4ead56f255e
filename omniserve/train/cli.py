"""Command functions for ``omniserve train``, ``check-parity``, ``synth`` and ``synth-eval``.

They are plain typer command functions, registered on the main ``omniserve`` app by ``cli.py``;
``python -m omniserve.train`` runs them standalone. Every heavy import happens inside a command.

Exit codes: 0 success; 1 parity differences (``check-parity``); 2 invalid input (bad data file,
not a model folder, bad option); 130 interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omniserve.flags import options_command
from omniserve.train.options import ParityOptions, TrainOptions

EXIT_DIFFERENCES = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@options_command(TrainOptions)
def train(options: TrainOptions) -> None:
    """Fine-tune a checkpoint on JSONL conversations, with prompts rendered exactly as the server renders them."""
    from omniserve.errors import ModelLoadError
    from omniserve.extras import LORA_MODULES, TRAIN_MODULES, require_extra
    from omniserve.train.checkpoints import last_checkpoint
    from omniserve.train.data import DataError
    from omniserve.train.sft import TrainSetupError, run_training

    try:
        # before the data is read or the model loaded: transformers' Trainer needs accelerate, --lora peft
        require_extra("train", (*TRAIN_MODULES, *(LORA_MODULES if options.lora else ())))
        result = run_training(options)
    except (DataError, ModelLoadError, TrainSetupError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        last = last_checkpoint(options.checkpoints_dir)
        kept = f"the last complete checkpoint is {last}; continue with --resume" if last else "no checkpoint was saved"
        raise _fail(f"interrupted; {kept}", EXIT_INTERRUPTED) from None
    if result.skipped_too_long:
        lines = ", ".join(str(n) for n in result.skipped_too_long[:10])
        more = " ..." if len(result.skipped_too_long) > 10 else ""
        typer.echo(
            f"skipped {len(result.skipped_too_long)} conversation(s) longer than --max-length {options.max_length} "
            f"({options.data} lines {lines}{more})",
            err=True,
        )
    typer.echo(result.describe_labels())
    losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
    resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
    typer.echo(
        f"trained {result.num_samples} samples, {result.global_step} steps{losses}{resumed} in {result.seconds:.0f} s"
    )
    if result.adapter is not None:
        typer.echo(f"LoRA adapter: {result.adapter}")
    if result.adapter is None or options.merge_lora:
        typer.echo(f"model: {result.output} (serve it with: omniserve deploy --model {result.output})")


@options_command(ParityOptions)
def check_parity(options: ParityOptions) -> None:
    """Check that every training prompt is token-for-token the prompt the server builds; exit 1 if not."""
    from omniserve.errors import ModelLoadError
    from omniserve.lora.adapter import adapter_base
    from omniserve.templates.render import PromptRenderer
    from omniserve.train.data import DataError, read_conversations
    from omniserve.train.features import limits_for
    from omniserve.train.model_io import check_model_folder
    from omniserve.train.parity import check_parity as run_check

    try:
        # a LoRA adapter folder (train --lora --no-merge-lora) is checked through its base's template and processor
        model = adapter_base(options.model) or options.model
        check_model_folder(model)
        conversations = read_conversations(options.data)
        renderer = PromptRenderer.from_pretrained(model)
        report = run_check(
            renderer, conversations, limits_for(options.data, options.media), strategy=options.mask_strategy
        )
    except (DataError, ModelLoadError) as exc:
        raise _fail(str(exc)) from None
    for difference in report.differences:
        typer.echo(str(difference))
    typer.echo(report.describe_strategies())
    summary = f"{report.conversations} conversations, {report.turns} assistant turns"
    if not report.ok:
        typer.echo(f"{summary}: {len(report.differences)} turn(s) differ between training and serving", err=True)
        raise typer.Exit(EXIT_DIFFERENCES)
    typer.echo(f"{summary}: training and serving prompts are token-identical")


def synth(
    output: Annotated[Path, typer.Option(help="Folder to write train.jsonl, test.jsonl and media/ into (empty).")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same bytes.")] = 0,
    train_size: Annotated[int, typer.Option(help="Training examples per task.")] = 400,
    test_size: Annotated[int, typer.Option(help="Test examples per task.")] = 100,
    task: Annotated[list[str] | None, typer.Option(help="Only this task (repeatable). Default: all.")] = None,
    espeak_program: Annotated[
        str | None,
        typer.Option(help="The espeak-ng program the spoken task speaks with (a path). Default: espeak-ng on PATH."),
    ] = None,
) -> None:
    """Write the synthetic omni tasks (image colour, video motion, audio pitch, text, mixed) as JSONL + media."""
    from omniserve.synth import TASKS, write_synthetic
    from omniserve.synth.speech_audio import DEFAULT_SPEAKER, Speaker

    try:
        summary = write_synthetic(
            output,
            seed=seed,
            train_size=train_size,
            test_size=test_size,
            tasks=tuple(task or TASKS),
            speaker=DEFAULT_SPEAKER if espeak_program is None else Speaker(espeak_program),
        )
    except (ValueError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    for split, counts in summary.counts.items():
        typer.echo(f"{output / f'{split}.jsonl'}: " + ", ".join(f"{n} {name}" for name, n in counts.items()))


def synth_eval(
    data: Annotated[Path, typer.Option(help="A synthetic test.jsonl (from omniserve synth).")],
    base_url: Annotated[str, typer.Option(help="The server's OpenAI base URL.")] = "http://127.0.0.1:8000/v1",
    model: Annotated[str | None, typer.Option(help="Model name; default: the first the server lists.")] = None,
    api_key: Annotated[str, typer.Option(help="API key, if the server wants one.")] = "none",
    per_task: Annotated[int | None, typer.Option(help="Score at most this many items per task.")] = None,
) -> None:
    """Score a running server on a synthetic test split (exact match, temperature 0), per task."""
    import openai

    from omniserve.synth.evaluate import score_server

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    name = model or client.models.list().data[0].id
    scores = score_server(client, name, data, per_task=per_task)
    for task_name, score in scores.items():
        typer.echo(f"{task_name:8s} {score.correct:4d}/{score.total:<4d} {100 * score.accuracy:5.1f}%")


def standalone_app() -> typer.Typer:
    """These commands on their own app, for ``python -m omniserve.train`` (the main CLI registers them too)."""
    app = typer.Typer(help="Train on the serving templates; synthetic omni tasks.", pretty_exceptions_enable=False)
    app.command()(train)
    app.command("check-parity")(check_parity)
    app.command()(synth)
    app.command("synth-eval")(synth_eval)
    return app
