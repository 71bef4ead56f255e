"""Options as data: every limit and setting is a field with a documented default.

The CLI builds these objects from flags; nothing below the CLI reads environment variables.
Per-request overrides (``mm_processor_kwargs`` in a request's extra body) are validated against
these server-side caps, never allowed to exceed them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


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
    max_video_pixels: int = Field(4096 * 4096, gt=0, description="Largest video frame (width x height) accepted.")
    max_audio_seconds: float = Field(300.0, gt=0, description="Longest audio clip accepted, in seconds.")
    audio_sample_rate: int = Field(16_000, gt=0, description="Rate audio is resampled to for the model.")
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
    fetch_timeout_seconds: float = Field(10.0, gt=0, description="Total time allowed to fetch one remote item.")
    max_redirects: int = Field(3, ge=0, description="Most HTTP redirects followed (each hop is re-checked).")


class EngineConfig(BaseModel):
    """Options shared by every engine; engine-specific ones travel in ``engine_args``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(description="Checkpoint folder (transformers layout).")
    served_model_name: str = Field(description="Name clients use in the `model` field.")
    max_concurrency: int = Field(8, gt=0, description="Most sequences decoded together in one batch.")
    max_queue: int = Field(64, ge=0, description="Most requests waiting for a batch slot; beyond it: 429.")
    max_model_len: int | None = Field(
        None, gt=0, description="Context window (prompt + completion); default: the checkpoint's."
    )
    max_n: int = Field(8, gt=0, description="Largest `n` (choices per request) accepted.")
    dtype: str = Field("float32", description="Weights dtype: float32 (fast on CPU), bfloat16 or float16.")
    device: str = Field("cpu", description="torch device for the transformers engine.")
    seed: int = Field(0, description="Seed for requests that do not give one.")
    engine_args: dict[str, str] = Field(default_factory=dict, description="Engine-specific KEY=VALUE options.")


class ServerConfig(BaseModel):
    """What the HTTP gateway needs: address, auth and request caps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 keeps the server local.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    api_keys: tuple[str, ...] = Field((), description="Accepted bearer tokens; empty disables auth.")
    max_request_bytes: int = Field(
        100 * 1024 * 1024, gt=0, description="Largest request body accepted, in bytes (413 beyond)."
    )
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 429 when the queue is full.")
    cors_origins: tuple[str, ...] = Field((), description="Origins allowed by CORS; empty disables CORS.")
    media: MediaLimits = Field(default_factory=MediaLimits)
