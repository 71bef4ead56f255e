"""Supervised fine-tuning: our features and collators, transformers' ``Trainer`` for the loop.

The trainer brings what a hand-written loop gets wrong: gradient accumulation with the loss
normalised over every label token of the step, LR schedules, RNG state and data order saved in
checkpoints and restored on resume. What is ours: samples rendered by the serving template
(``features``), padding/packing (``collate``), checkpoints that are complete or absent
(``checkpoints``), the model saved in its source layout (``model_io``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.train.checkpoints import last_checkpoint, remove_partial
from omniserve.train.data import Conversation, DataError, read_conversations
from omniserve.train.features import EncodedData, describe_strategies, encode_all, limits_for
from omniserve.train.model_io import check_model_folder
from omniserve.train.options import TrainOptions

logger = logging.getLogger(__name__)


class TrainSetupError(ValueError):
    """The run cannot start as asked (e.g. an output folder holding another run)."""


@dataclass
class TrainResult:
    output: Path
    global_step: int
    losses: list[float]  # the logged training loss, in order
    num_samples: int
    skipped_too_long: list[int]  # line numbers
    seconds: float
    tokens_seen: int
    resumed_from: Path | None = None
    adapter: Path | None = None
    # how the assistant tokens were found: mask strategy -> conversations (see templates/training.py)
    label_strategies: dict[str, int] = field(default_factory=dict)

    def describe_labels(self) -> str:
        """One line saying which mask strategy labelled how many conversations, for the user to read."""
        return describe_strategies(self.label_strategies)


def run_training(options: TrainOptions) -> TrainResult:
    """Train as ``options`` say and save the model to ``options.output``; see ``omniserve train --help``."""
    started = time.monotonic()
    check_model_folder(options.model)
    resume_from = _prepare_output(options)
    conversations = read_conversations(options.data)
    exclusive, media = _exclusive_media(options.model, conversations)
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(options.model)
    encoded = _encode(renderer, conversations, options)
    _report_strategies(encoded, len(conversations))
    trainer, peft_model, model = _build_trainer(options, renderer, encoded, exclusive, media)
    with _sigterm_as_interrupt():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    adapter = _save(options, model, peft_model)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return TrainResult(
        output=options.output,
        global_step=trainer.state.global_step,
        losses=losses,
        num_samples=len(encoded.samples),
        skipped_too_long=encoded.skipped_too_long,
        seconds=time.monotonic() - started,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        resumed_from=resume_from,
        adapter=adapter,
        label_strategies=dict(encoded.strategies),
    )


def _prepare_output(options: TrainOptions) -> Path | None:
    checkpoints = options.checkpoints_dir
    remove_partial(checkpoints)
    last = last_checkpoint(checkpoints)
    if options.resume:
        return last  # None: nothing saved yet, start from the beginning
    if last is not None:
        raise TrainSetupError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume or another --output")
    if (options.output / "config.json").exists():
        raise TrainSetupError(f"{options.output} already holds a model; choose another --output")
    return None


def _encode(renderer: Any, conversations: list[Any], options: TrainOptions) -> EncodedData:
    from tqdm.auto import tqdm

    with tqdm(total=len(conversations), desc="encoding", disable=not options.progress, leave=False) as bar:
        return encode_all(
            renderer,
            conversations,
            limits_for(options.data, options.media),
            max_length=options.max_length,
            too_long=options.too_long,
            progress=bar.update,
            strategy=options.mask_strategy,
        )


def _report_strategies(encoded: EncodedData, conversations: int) -> None:
    """Say how the labels were found; loudly when conversations became one sample per turn.

    ``per-turn`` and ``served-prompt`` change what the run is (more samples than conversations, earlier turns
    repeated as context), so they are logged as a warning, which reaches the terminal without any logging set up.
    """
    line = encoded.describe_strategies()
    if {"per-turn", "served-prompt"} & set(encoded.strategies):
        logger.warning("%s; %d conversations gave %d samples", line, conversations, len(encoded.samples))
    else:
        logger.info(line)


def _build_trainer(
    options: TrainOptions,
    renderer: Any,
    encoded: EncodedData,
    exclusive: frozenset[str] = frozenset(),
    media: dict[int, frozenset[str]] | None = None,
) -> tuple[Any, Any, Any]:
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from omniserve.train.model_io import add_lora, load_trainable
    from omniserve.train.optim import grouped_adamw
    from omniserve.train.progress import progress_callback_class
    from omniserve.train.trainer import trainer_class

    model = load_trainable(options.model)
    peft_model = (
        add_lora(model, rank=options.lora_rank, alpha=options.lora_alpha, dropout=options.lora_dropout)
        if options.lora
        else None
    )
    trained = peft_model if peft_model is not None else model.module
    tokenizer = renderer.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dataset, collator, batch_size = _dataset_and_collator(options, encoded, trained, pad_id, exclusive, media or {})
    args = TrainingArguments(
        output_dir=str(options.checkpoints_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        logging_steps=options.logging_steps,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        include_num_input_tokens_seen="non_padding",  # counted by OmniTrainer
        disable_tqdm=not options.progress,
        label_names=["labels"],
    )
    # No processing_class: the trainer would "align" the model's eos/pad ids to the tokenizer's and
    # save a config that differs from the source's.
    optimizer = None
    if options.tower_learning_rate is not None:
        optimizer = grouped_adamw(
            trained,
            learning_rate=options.learning_rate,
            tower_learning_rate=options.tower_learning_rate,
            weight_decay=options.weight_decay,
        )
    trainer = trainer_class()(
        model=trained,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        optimizers=(optimizer, None),
        pad_token_id=pad_id,
    )
    trainer.remove_callback(ProgressCallback)
    if options.progress:
        trainer.add_callback(progress_callback_class())
    return trainer, peft_model, model


def _dataset_and_collator(
    options: TrainOptions,
    encoded: EncodedData,
    trained: Any,
    pad_id: int,
    exclusive: frozenset[str] = frozenset(),
    media: dict[int, frozenset[str]] | None = None,
) -> tuple[list[Any], Any, int]:
    """Samples one per row, or packs of samples (planned once, then shuffled by the trainer like samples), and the
    trainer's batch size.

    A family whose forward pass takes only one of some inputs (``exclusive``) gets its batches planned once too
    (``plan_batches``, packs planned apart), each a dataset item the trainer shuffles: one item a step.
    """
    from omniserve.train.collate import (
        GroupedCollator,
        PackingCollator,
        PaddingCollator,
        PositionPlanner,
        plan_batches,
        plan_packs,
        plan_packs_apart,
    )

    samples = encoded.samples
    kinds = [(media or {}).get(s.line, frozenset()) for s in samples]
    collator: Any
    if not options.packing:
        items: list[Any] = list(samples)
        collator = PaddingCollator(pad_id)
    else:
        lengths = [len(s) for s in samples]
        packs = (
            plan_packs_apart(lengths, kinds, options.max_length, exclusive)
            if exclusive
            else plan_packs(lengths, options.max_length)
        )
        items = [[samples[i] for i in pack] for pack in packs]
        kinds = [frozenset().union(*(kinds[i] for i in pack)) for pack in packs]
        collator = PackingCollator(pad_id, PositionPlanner.for_model(trained))
    if not exclusive or options.batch_size == 1:
        return items, collator, options.batch_size
    batches = plan_batches(kinds, options.batch_size, exclusive)
    return [[items[i] for i in batch] for batch in batches], GroupedCollator(collator), 1


def _exclusive_media(
    model: Path, conversations: list[Conversation]
) -> tuple[frozenset[str], dict[int, frozenset[str]]]:
    """The model family's ``exclusive_media`` and each line's media kinds; a conversation holding two is refused."""
    from omniserve.models.families import check_supported
    from omniserve.train.collate import exclusive_kinds

    family = check_supported(model)
    if family is None or not family.exclusive_media:
        return frozenset(), {}
    media = {c.line: c.media_kinds() for c in conversations}
    for index, conversation in enumerate(conversations):
        held = exclusive_kinds(media[conversation.line], family.exclusive_media)
        if len(held) > 1:
            raise DataError(
                conversation.path,
                conversation.line,
                f"sample {index} holds {' and '.join(sorted(held))} input, but {family.title} takes only one of them "
                "in a forward pass; split it into samples of one medium each",
            )
    return family.exclusive_media, media


def _save(options: TrainOptions, model: Any, peft_model: Any) -> Path | None:
    from omniserve.train.model_io import merge_lora, save_like_source

    adapter = None
    if peft_model is not None:
        adapter = options.output / "adapter"
        for config in peft_model.peft_config.values():
            # where the base is, so the adapter folder alone is enough for deploy --lora and check-parity
            config.base_model_name_or_path = str(options.model.resolve())
        peft_model.save_pretrained(str(adapter))
        if not options.merge_lora:
            return adapter
        merge_lora(peft_model)
    model.module.eval()
    save_like_source(model, options.output, dtype=options.save_dtype)
    return adapter


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what ``kill``, Kubernetes and systemd send) stops training like Ctrl-C does.

    Either way the run stops between two Python bytecodes; a checkpoint being written stays in
    its staging folder and never becomes visible, so the last complete checkpoint is what remains.
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signal handling to whoever owns it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
