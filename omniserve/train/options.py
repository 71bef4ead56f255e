"""Training options as data: one pydantic object built by the CLI (or a caller) and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from omniserve.config import MediaLimits

#: The media settings ``train`` and ``check-parity`` take as flags (the same caps and budgets as the server,
#: since a training sample is rendered as a served request is; the rest come from a config file).
TRAINING_MEDIA_FLAGS = [
    "video_fps",
    "max_video_frames",
    "limit_media_per_request",
    "max_pixels_per_request",
    "max_audio_seconds_per_request",
]

#: How assistant tokens are found: declared once for ``train`` and ``check-parity``.
MaskStrategyOption = Annotated[
    Literal["auto", "markers", "prefix", "per-turn", "served-prompt"],
    Field(
        description=(
            "How assistant tokens are found: the template's {% generation %} markers, prefix renderings "
            "(one sample per conversation), per-turn (one sample per assistant turn) or served-prompt (one "
            "sample per turn: the prompt the server sends, then the answer); auto: served-prompt where the "
            "generation prompt differs from the history only in whitespace, else markers if the template has "
            "them, else prefix, else per-turn where the template rewrites earlier turns."
        ),
    ),
]


class TrainOptions(BaseModel):
    """Everything ``omniserve train`` can be told; defaults suit a small fine-tune on a CPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(description="Checkpoint folder to start from (transformers layout).")
    data: Path = Field(description="JSONL file of OpenAI-style conversations; media paths relative to it.")
    output: Path = Field(description="Folder for the trained model (and its checkpoints/ while training).")
    lora: bool = Field(False, description="Train LoRA adapters on the language model instead of all weights.")
    lora_rank: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (scaling = alpha / rank).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    merge_lora: bool = Field(True, description="With --lora, also save the merged model (servable as-is).")
    packing: bool = Field(False, description="Pack several samples per row up to --max-length.")
    max_length: int = Field(2048, gt=0, description="Longest sample (and packed row) in tokens.")
    too_long: Literal["skip", "fail"] = Field("skip", description="What to do with samples over --max-length.")
    mask_strategy: MaskStrategyOption = "auto"
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when --max-steps is given).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass (samples, or packs with --packing).")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    tower_learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate of the vision/audio towers (default: --learning-rate)."
    )
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (linear, cosine, constant...).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    save_steps: int = Field(100, gt=0, description="Save a checkpoint every this many steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (oldest deleted first).")
    logging_steps: int = Field(1, gt=0, description="Update the loss shown every this many steps.")
    seed: int = Field(0, description="Seed for initialisation of adapters, shuffling and dropout.")
    resume: bool = Field(False, description="Continue from the last complete checkpoint in OUTPUT/checkpoints.")
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Store the final weights in this dtype (default: as trained)."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    media: MediaLimits = Field(
        default_factory=MediaLimits,
        description="Media decoding settings: use the server's.",
        json_schema_extra={"flags": TRAINING_MEDIA_FLAGS},
    )

    @property
    def checkpoints_dir(self) -> Path:
        return self.output / "checkpoints"


class ParityOptions(BaseModel):
    """What ``omniserve check-parity`` compares: a checkpoint's serving prompts against its training encoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(
        description="Checkpoint folder whose processor and chat template are checked (or a LoRA adapter folder: its "
        "base's are)."
    )
    data: Path = Field(description="JSONL file of OpenAI-style conversations; media paths relative to it.")
    media: MediaLimits = Field(
        default_factory=MediaLimits,
        description="Media decoding settings: use the server's.",
        json_schema_extra={"flags": TRAINING_MEDIA_FLAGS},
    )
    mask_strategy: MaskStrategyOption = "auto"
