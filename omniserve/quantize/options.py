"""Every option of a quantization run, as data with a documented default (the CLI builds it from flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from omniserve.config import MediaLimits


class QuantizeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(description="Full-precision checkpoint folder to quantize.")
    method: str = Field(description="gptq | awq | fp8 | fp8-static (one recipe file each in quantize/).")
    output: Path = Field(description="Folder to create with the quantized checkpoint and its report.")
    scheme: str | None = Field(None, description="Scheme from the recipe's list; default: the recipe's default.")
    recipe: Path | None = Field(None, description="Recipe YAML to use instead of quantize/<method>.yaml.")
    calibration: Path | None = Field(
        None, description="JSONL of OpenAI-style conversations; default: the built-in set in quantize/calibration/."
    )
    num_samples: int | None = Field(None, gt=0, description="Calibration samples to use; default: the recipe's.")
    max_length: int | None = Field(None, gt=0, description="Tokens kept per text sample; default: the recipe's.")
    fidelity_samples: int = Field(
        4, ge=0, description="Samples at the end of the calibration file held out to measure fidelity (at most half)."
    )
    quantize_towers: bool = Field(
        False, description="Also quantize vision/audio towers and projectors (lm_head and embeddings stay)."
    )
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    device: str = Field("auto", description="Where calibration runs: auto (cuda if present, else cpu), cpu, cuda...")
    progress: bool = Field(True, description="Show progress bars.")
    media: MediaLimits = Field(
        default_factory=MediaLimits,
        description="Limits for decoding calibration media.",
        json_schema_extra={"cli": False},
    )
    log_level: str = Field("info", description="Log level.")
