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

from omniserve.config import MediaLimits
from omniserve.train.options import TrainOptions

EXIT_DIFFERENCES = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _help(name: str) -> str:
    return str(TrainOptions.model_fields[name].description)


def _default(name: str) -> object:
    return TrainOptions.model_fields[name].default


def _media_help(name: str) -> str:
    return f"{MediaLimits.model_fields[name].description} Use the server's setting."


def _media(video_fps: float, max_video_frames: int) -> MediaLimits:
    return MediaLimits(video_fps=video_fps, max_video_frames=max_video_frames)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def train(
    model: Annotated[Path, typer.Option(help=_help("model"))],
    data: Annotated[Path, typer.Option(help=_help("data"))],
    output: Annotated[Path, typer.Option(help=_help("output"))],
    lora: Annotated[bool, typer.Option(help=_help("lora"))] = False,
    lora_rank: Annotated[int, typer.Option(help=_help("lora_rank"))] = _default("lora_rank"),  # type: ignore[assignment]
    lora_alpha: Annotated[int, typer.Option(help=_help("lora_alpha"))] = _default("lora_alpha"),  # type: ignore[assignment]
    merge_lora: Annotated[bool, typer.Option(help=_help("merge_lora"))] = True,
    packing: Annotated[bool, typer.Option(help=_help("packing"))] = False,
    max_length: Annotated[int, typer.Option(help=_help("max_length"))] = _default("max_length"),  # type: ignore[assignment]
    too_long: Annotated[str, typer.Option(help=f"{_help('too_long')} skip | fail")] = "skip",
    epochs: Annotated[float, typer.Option(help=_help("epochs"))] = _default("epochs"),  # type: ignore[assignment]
    max_steps: Annotated[int | None, typer.Option(help=_help("max_steps"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help("batch_size"))] = _default("batch_size"),  # type: ignore[assignment]
    grad_accum: Annotated[int, typer.Option(help=_help("grad_accum"))] = _default("grad_accum"),  # type: ignore[assignment]
    learning_rate: Annotated[float, typer.Option(help=_help("learning_rate"))] = _default("learning_rate"),  # type: ignore[assignment]
    tower_learning_rate: Annotated[float | None, typer.Option(help=_help("tower_learning_rate"))] = None,
    lr_scheduler: Annotated[str, typer.Option(help=_help("lr_scheduler"))] = _default("lr_scheduler"),  # type: ignore[assignment]
    warmup_steps: Annotated[int, typer.Option(help=_help("warmup_steps"))] = _default("warmup_steps"),  # type: ignore[assignment]
    weight_decay: Annotated[float, typer.Option(help=_help("weight_decay"))] = _default("weight_decay"),  # type: ignore[assignment]
    save_steps: Annotated[int, typer.Option(help=_help("save_steps"))] = _default("save_steps"),  # type: ignore[assignment]
    save_total_limit: Annotated[int, typer.Option(help=_help("save_total_limit"))] = _default("save_total_limit"),  # type: ignore[assignment]
    logging_steps: Annotated[int, typer.Option(help=_help("logging_steps"))] = _default("logging_steps"),  # type: ignore[assignment]
    seed: Annotated[int, typer.Option(help=_help("seed"))] = 0,
    resume: Annotated[bool, typer.Option(help=_help("resume"))] = False,
    save_dtype: Annotated[str | None, typer.Option(help=f"{_help('save_dtype')} float32 | bfloat16 | float16")] = None,
    video_fps: Annotated[float, typer.Option(help=_media_help("video_fps"))] = MediaLimits().video_fps,
    max_video_frames: Annotated[
        int, typer.Option(help=_media_help("max_video_frames"))
    ] = MediaLimits().max_video_frames,
    progress: Annotated[bool, typer.Option(help=_help("progress"))] = True,
) -> None:
    """Fine-tune a checkpoint on JSONL conversations, with prompts rendered exactly as the server renders them."""
    from pydantic import ValidationError

    from omniserve.errors import ModelLoadError
    from omniserve.train.checkpoints import last_checkpoint
    from omniserve.train.data import DataError

    try:
        options = TrainOptions(
            model=model,
            data=data,
            output=output,
            lora=lora,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            merge_lora=merge_lora,
            packing=packing,
            max_length=max_length,
            too_long=too_long,  # type: ignore[arg-type]
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            learning_rate=learning_rate,
            tower_learning_rate=tower_learning_rate,
            lr_scheduler=lr_scheduler,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            logging_steps=logging_steps,
            seed=seed,
            resume=resume,
            save_dtype=save_dtype,  # type: ignore[arg-type]
            progress=progress,
            media=_media(video_fps, max_video_frames),
        )
    except ValidationError as exc:
        raise _fail(f"invalid option: {exc}") from None
    from omniserve.train.sft import TrainSetupError, run_training

    try:
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
            f"skipped {len(result.skipped_too_long)} conversation(s) longer than --max-length {max_length} "
            f"({data} lines {lines}{more})",
            err=True,
        )
    losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
    resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
    typer.echo(
        f"trained {result.num_samples} samples, {result.global_step} steps{losses}{resumed} in {result.seconds:.0f} s"
    )
    if result.adapter is not None:
        typer.echo(f"LoRA adapter: {result.adapter}")
    if result.adapter is None or merge_lora:
        typer.echo(f"model: {result.output} (serve it with: omniserve deploy --model {result.output})")


def check_parity(
    model: Annotated[Path, typer.Option(help="Checkpoint folder whose processor and chat template are checked.")],
    data: Annotated[Path, typer.Option(help=_help("data"))],
    video_fps: Annotated[float, typer.Option(help=_media_help("video_fps"))] = MediaLimits().video_fps,
    max_video_frames: Annotated[
        int, typer.Option(help=_media_help("max_video_frames"))
    ] = MediaLimits().max_video_frames,
) -> None:
    """Check that every training prompt is token-for-token the prompt the server builds; exit 1 if not."""
    from omniserve.errors import ModelLoadError
    from omniserve.templates.render import PromptRenderer
    from omniserve.train.data import DataError, read_conversations
    from omniserve.train.features import limits_for
    from omniserve.train.model_io import check_model_folder
    from omniserve.train.parity import check_parity as run_check

    try:
        check_model_folder(model)
        conversations = read_conversations(data)
        renderer = PromptRenderer.from_pretrained(model)
        report = run_check(renderer, conversations, limits_for(data, _media(video_fps, max_video_frames)))
    except (DataError, ModelLoadError) as exc:
        raise _fail(str(exc)) from None
    for difference in report.differences:
        typer.echo(str(difference))
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
) -> None:
    """Write the synthetic omni tasks (image colour, video motion, audio pitch, text, mixed) as JSONL + media."""
    from omniserve.synth import TASKS, write_synthetic

    try:
        summary = write_synthetic(
            output, seed=seed, train_size=train_size, test_size=test_size, tasks=tuple(task or TASKS)
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
