"""Options as data: every limit and setting is a field with a documented default.

The CLI builds these objects from flags; nothing below the CLI reads environment variables.
Per-request overrides (``mm_processor_kwargs`` in a request's extra body) are validated against
these server-side caps, never allowed to exceed them.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: ``--quant`` / ``--method`` values, each with its recipe file ``quantize/<method>.yaml``.
QuantMethod = Literal["gptq", "awq", "fp8", "fp8-static"]
QUANT_METHODS: tuple[str, ...] = typing.get_args(QuantMethod)


class MediaLimits(BaseModel):
    """Caps and policy for fetching and decoding media; defaults a careful operator would choose."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_media_bytes: int = Field(
        50 * 1024 * 1024, gt=0, description="Largest single media item (downloaded or base64-decoded), in bytes."
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Images whose header declares more pixels are refused before decoding."
    )
    video_fps: float = Field(2.0, gt=0, description="Default frame sampling rate for videos (frames per second).")
    max_video_frames: int = Field(32, gt=0, description="Most frames sampled from one video.")
    max_video_seconds: float = Field(600.0, gt=0, description="Longest video accepted, in seconds.")
    max_video_pixels: int = Field(
        4096 * 4096,
        gt=0,
        description="Largest video frame (width x height) accepted.",
        json_schema_extra={"cli": False},
    )
    max_audio_seconds: float = Field(300.0, gt=0, description="Longest audio clip accepted, in seconds.")
    audio_sample_rate: int = Field(
        16_000, gt=0, description="Rate audio is resampled to for the model.", json_schema_extra={"cli": False}
    )
    allowed_media_domains: tuple[str, ...] | None = Field(
        None, description="If set, remote media may only come from these host names (exact or subdomain)."
    )
    allow_private_media_addresses: bool = Field(
        False,
        description="Allow media URLs resolving to loopback, private, link-local or metadata addresses.",
    )
    allowed_local_media_path: Path | None = Field(
        None, description="Directory under which file:// URLs and bare paths may be read; None refuses them."
    )
    fetch_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Total time allowed to fetch one remote item.",
        json_schema_extra={"flag": "media-fetch-timeout"},
    )
    max_redirects: int = Field(
        3, ge=0, description="Most HTTP redirects followed (each hop is re-checked).", json_schema_extra={"cli": False}
    )

    @field_validator("allowed_local_media_path")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Checked against resolved request paths, so it must be resolved itself (``..``, links)."""
        return path.expanduser().resolve() if path is not None else None


class EngineOptions(BaseModel):
    """How an engine runs, whatever the checkpoint; engine-specific options travel in ``engine_args``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrency: int = Field(8, gt=0, description="Most sequences decoded together in one batch.")
    max_queue: int = Field(64, ge=0, description="Most requests waiting for a batch slot; beyond it: 429.")
    max_model_len: int | None = Field(
        None, gt=0, description="Context window (prompt + completion); default: the checkpoint's."
    )
    max_n: int = Field(8, gt=0, description="Largest `n` (choices per request) accepted.")
    dtype: str = Field("float32", description="Weights dtype: float32 (fast on CPU), bfloat16 or float16.")
    device: str = Field("cpu", description="torch device for the transformers engine.")
    seed: int = Field(0, description="Seed for requests that do not give one.", json_schema_extra={"cli": False})
    engine_args: dict[str, str] = Field(
        default_factory=dict, description="Engine-specific option.", json_schema_extra={"flag": "engine-arg"}
    )


class EngineConfig(EngineOptions):
    """What an engine is created with: the options plus the checkpoint and the name it is served under."""

    model: Path = Field(description="Checkpoint folder (transformers layout).")
    served_model_name: str = Field(description="Name clients use in the `model` field.")


class ServerConfig(BaseModel):
    """What the HTTP gateway needs: address, auth and request caps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 keeps the server local.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    api_keys: tuple[str, ...] = Field(
        (), description="Accepted API key (bearer token); none: no auth.", json_schema_extra={"flag": "api-key"}
    )
    max_request_bytes: int = Field(
        100 * 1024 * 1024, gt=0, description="Largest request body accepted, in bytes (413 beyond)."
    )
    retry_after_seconds: int = Field(
        1, ge=1, description="Retry-After sent with 429 when the queue is full.", json_schema_extra={"cli": False}
    )
    cors_origins: tuple[str, ...] = Field(
        (), description="Origin allowed by CORS; none: CORS off.", json_schema_extra={"flag": "cors-origin"}
    )
    media: MediaLimits = Field(default_factory=MediaLimits)


class DeployOptions(BaseModel):
    """Everything ``omniserve deploy`` can be told: its flags, its ``--config`` file, the Helm values' source.

    The quality gate and ``eval``/``bench`` start servers from this object too (written as the
    ``--config`` file of the server they start), so a server they start is configured exactly as
    the one a user would deploy.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path | None = Field(None, description="Checkpoint folder. Default: the built-in demo omni model.")
    engine: str = Field("transformers", description="Inference engine: transformers | vllm | sglang | lmdeploy.")
    served_model_name: str | None = Field(None, description="Name clients use; default: the folder name.")
    api_key_file: Path | None = Field(None, description="File with one API key per line.")
    engine_options: EngineOptions = Field(default_factory=EngineOptions)
    server: ServerConfig = Field(default_factory=lambda: ServerConfig())
    log_level: str = Field("info", description="Log level.")
    quant: QuantMethod | None = Field(
        None,
        description="Quantize first into --quant-cache-dir and serve the cached result; a checkpoint that is "
        "already quantized is served as it is.",
    )
    quant_cache_dir: Path | None = Field(None, description="Cache for --quant. Default: ~/.cache/omniserve/quantized.")
    quantize_only: bool = Field(
        False, description="With --quant: fill the cache, print the quantized folder and exit (an init step)."
    )
    gate: str | None = Field(
        None,
        description="With --quant: score the quantized model against the original on this eval suite "
        "(SUITE or SUITE:MAX_DROP, points, default drop 2) and refuse to serve it (exit 3) when it loses "
        "more. Scores are cached with the quantized checkpoint, so the gate runs once.",
    )
    force: bool = Field(
        False, description="With --gate: serve the quantized model even when the gate fails (a warning)."
    )
    print_k8s: bool = Field(
        False, description="Print Helm values for helm/omniserve equivalent to this command, then exit."
    )

    @model_validator(mode="after")
    def _combinations(self) -> DeployOptions:
        """Meaningless combinations are refused before minutes of quantizing (and by ``--print-k8s`` too)."""
        if self.gate is not None and self.quant is None:
            raise ValueError("--gate compares a quantized model with its original: it needs --quant")
        if self.force and self.gate is None:
            raise ValueError("--force overrides a failed quality gate: it needs --gate")
        if self.quantize_only and self.quant is None:
            raise ValueError("--quantize-only needs --quant")
        return self
