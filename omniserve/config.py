"""Options as data: every limit and setting is a field with a documented default.

The CLI builds these objects from flags; nothing below the CLI reads environment variables.
Per-request overrides (``mm_processor_kwargs`` in a request's extra body) are validated against
these server-side caps, never allowed to exceed them.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Literal

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
    # One request's share. Counted before anything is fetched or decoded: a request of 1,520 tiny audio
    # clips once made the server allocate 23 GB (the feature extractor pads every clip to 30 s).
    limit_media_per_request: dict[str, int] = Field(
        default_factory=dict,
        description="Most media parts of one kind in one request (KIND=COUNT for image, video, audio; also "
        "comma-separated); 0 refuses the kind. Defaults: image=16, video=2, audio=4.",
    )
    max_pixels_per_request: int = Field(
        100_000_000,
        gt=0,
        description="Most pixels one request may decode, images and video frames together (3 bytes each as "
        "RGB); refused from the headers, before decoding.",
    )
    max_audio_seconds_per_request: float = Field(
        600.0, gt=0, description="Most seconds of audio one request may decode, all its clips together."
    )
    # The whole process's share: decoding waits (up to media_wait_timeout_seconds, then 503) for both.
    max_concurrent_decodes: int = Field(
        4, gt=0, description="Most media items decoded at once across all requests (each takes a CPU thread)."
    )
    max_decoded_media_bytes: int = Field(
        1024**3,
        gt=0,
        description="Most bytes of decoded media held at once across all requests, reserved from the headers "
        "before decoding; at least one request's worth (--max-pixels-per-request x 3 + "
        "--max-audio-seconds-per-request x 64,000 for 16 kHz float32 samples).",
    )
    media_wait_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest a request waits for a decode slot or decoded-media memory before a 503 with Retry-After.",
        json_schema_extra={"flag": "media-wait-timeout"},
    )
    media_decode_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest one media item may take to read and decode (checked between packets and frames); "
        "beyond it: 400.",
        json_schema_extra={"flag": "media-decode-timeout"},
    )
    # FFmpeg's own container limits, set explicitly: its defaults fit every real file, so they are
    # config-file settings, not flags.
    media_probe_bytes: int = Field(
        5_000_000,
        ge=32,
        description="Bytes FFmpeg may read to identify a container's streams (its probesize).",
        json_schema_extra={"cli": False},
    )
    media_probe_seconds: float = Field(
        5.0,
        ge=0,
        description="Media time FFmpeg may analyse to identify a container's streams (its analyzeduration).",
        json_schema_extra={"cli": False},
    )
    max_media_streams: int = Field(
        32, gt=0, description="Most streams a video or audio container may have.", json_schema_extra={"cli": False}
    )

    #: ``limit_media_per_request`` for the kinds it does not name.
    DEFAULT_MEDIA_PER_REQUEST: ClassVar[Mapping[str, int]] = MappingProxyType({"image": 16, "video": 2, "audio": 4})

    @field_validator("allowed_local_media_path")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Checked against resolved request paths, so it must be resolved itself (``..``, links)."""
        return path.expanduser().resolve() if path is not None else None

    @field_validator("limit_media_per_request", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``image=16,video=2`` in one flag arrives as ``{"image": "16,video=2"}``; so does a config string."""
        text = value if isinstance(value, str) else None
        if isinstance(value, Mapping) and any(isinstance(v, str) and "," in v for v in value.values()):
            text = ",".join(f"{key}={item}" for key, item in value.items())
        if text is None:
            return value
        pairs = [part.partition("=") for part in text.split(",") if part.strip()]
        bad = [key + sep + item for key, sep, item in pairs if not sep]
        if bad:
            raise ValueError(f"expected KIND=COUNT, got {bad[0].strip()!r}")
        return {key.strip(): item.strip() for key, _, item in pairs}

    @field_validator("limit_media_per_request")
    @classmethod
    def _known_kinds(cls, limits: dict[str, int]) -> dict[str, int]:
        for kind, count in limits.items():
            if kind not in cls.DEFAULT_MEDIA_PER_REQUEST:
                raise ValueError(f"unknown media kind {kind!r}; kinds: {', '.join(cls.DEFAULT_MEDIA_PER_REQUEST)}")
            if count < 0:
                raise ValueError(f"{kind}={count}: a count cannot be negative (0 refuses the kind)")
        return limits

    @model_validator(mode="after")
    def _one_request_fits(self) -> MediaLimits:
        """A request within its budgets must be able to decode at all: else it would wait, get a 503 and
        retry forever. Refused at start-up, naming the options to change."""
        need = self.request_bytes_bound()
        if self.max_decoded_media_bytes < need:
            raise ValueError(
                f"--max-decoded-media-bytes {self.max_decoded_media_bytes} is less than one request may decode "
                f"({need} bytes: --max-pixels-per-request {self.max_pixels_per_request} x 3 + "
                f"--max-audio-seconds-per-request {self.max_audio_seconds_per_request:g} x "
                f"{self.audio_sample_rate} Hz x 4); raise it or lower those"
            )
        return self

    def media_per_request(self, kind: str) -> int:
        """How many parts of ``kind`` one request may carry."""
        return self.limit_media_per_request.get(kind, self.DEFAULT_MEDIA_PER_REQUEST[kind])

    def request_bytes_bound(self) -> int:
        """The most decoded bytes one request within its budgets can hold: RGB pixels and float32 samples."""
        return (
            self.max_pixels_per_request * 3 + math.ceil(self.max_audio_seconds_per_request * self.audio_sample_rate) * 4
        )


#: Short dtype names accepted on the command line, and the name every engine is given.
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


class EngineOptions(BaseModel):
    """How an engine runs, whatever the checkpoint; engine-specific options travel in ``engine_args``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrency: int = Field(8, gt=0, description="Most sequences decoded together in one batch.")
    max_queue: int = Field(
        64, ge=0, description="Most sequences (choices) waiting for a batch slot; beyond it a request gets 429."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Context window (prompt + completion); default: the checkpoint's."
    )
    max_n: int = Field(8, gt=0, description="Largest `n` (choices per request) accepted.")
    max_batch_tokens: int = Field(
        2048,
        gt=0,
        description=(
            "Tokens one step of the transformers engine computes: each running sequence counts 1, the rest "
            "goes to prompts being prefilled, so a long prompt is prefilled in chunks between decode steps "
            "(a prompt with media is prefilled whole)."
        ),
    )
    prefix_cache_tokens: int = Field(
        8192,
        ge=0,
        description=(
            "Transformers engine: prompt tokens whose KV is kept for reuse by later prompts that start the same "
            "way (a system prompt, a conversation's earlier turns), in blocks, least recently used dropped first; "
            "keyed by token ids, the LoRA adapter and the prompt's media content. 0 turns prefix caching off."
        ),
    )
    encoder_cache_items: int = Field(
        64,
        ge=0,
        description=(
            "Transformers engine: images/videos/audio clips whose encoder output is kept, so the same media (by "
            "content and processing options) is encoded once while it stays; least recently used dropped first. 0: off."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "Compute dtype. auto: the transformers engine picks bfloat16 where the processor computes it "
            "natively (AVX-512 BF16 or AMX CPUs, bf16 GPUs) and float32 elsewhere, and logs the choice; "
            "vLLM, SGLang and LMDeploy apply their own auto rule. Also: fp32/float, bf16, fp16/half."
        ),
    )
    device: str = Field("cpu", description="torch device for the transformers engine.")
    threads: int | None = Field(
        None,
        gt=0,
        description=(
            "Compute threads of the transformers engine; default: the cores this process may use "
            "(CPU affinity and cgroup quota), not the machine's."
        ),
    )
    linear_kernel: Literal["auto", "torch", "onednn"] = Field(
        "auto",
        description=(
            "Transformers engine on CPU: how linear layers compute. onednn: oneDNN on weights reordered once "
            "at load (2-4x faster decode in bfloat16, same results; costs a second copy of those weights); "
            "torch: plain torch.nn.functional.linear; auto: onednn for bfloat16, torch for float32 (where "
            "MKL is as fast at 1 row). An onednn that cannot run (GPU, float16) fails at start."
        ),
    )
    seed: int = Field(
        0,
        description="The engine's own global seed (vLLM, SGLang); a request without `seed` samples at random.",
        json_schema_extra={"cli": False},
    )
    engine_args: dict[str, str] = Field(
        default_factory=dict, description="Engine-specific option.", json_schema_extra={"flag": "engine-arg"}
    )
    ray_address: str | None = Field(
        None,
        description="vLLM only: run the engine's workers on this existing Ray cluster, HOST:PORT of its head "
        "(the address `ray start --address` takes), or auto for the cluster `ray start` began on this node; "
        "implies --engine-arg distributed_executor_backend=ray. Checked at start (multinode extra).",
    )
    # LoRA (omniserve/lora, docs/lora.md): engines size their adapter slots from these
    max_loras: int = Field(
        4,
        gt=0,
        description="Most LoRA adapters resident at once; the least recently used one is unloaded to make room "
        "(and reloaded from its folder when asked for again).",
    )
    max_lora_rank: int = Field(64, gt=0, description="Largest LoRA rank accepted (an adapter above it is refused).")
    enable_lora: bool = Field(
        False,
        description="Whether adapters may be served at all (set by deploy when --lora or --allow-runtime-lora is "
        "given): vLLM reserves LoRA slots and kernels only then.",
        json_schema_extra={"cli": False},
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _canonical_dtype(cls, value: object) -> object:
        """One name per dtype from here on: every engine (and vLLM's own parser) gets the long name."""
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


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
    # Shutdown on SIGTERM/SIGINT (server/drain.py): refuse new work at once, keep accepting connections for
    # the delay, let running requests finish within the timeout, then end what is left with an error.
    # A supervisor's grace period (Kubernetes terminationGracePeriodSeconds) must exceed the two together.
    drain_delay_seconds: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM/SIGINT, keep accepting connections this long (answering 503 + Retry-After, "
        "/health 503) so load balancers stop sending before the socket closes.",
        json_schema_extra={"flag": "drain-delay"},
    )
    drain_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="After the drain delay, how long running requests may take to finish; streams still "
        "running then end with an error event and [DONE].",
        json_schema_extra={"flag": "drain-timeout"},
    )
    stall_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="/health answers 503 when the engine has had work pending without progress for this long "
        "(transformers engine: a finished prefill or decode step; other engines: a token reaching the gateway).",
        json_schema_extra={"flag": "stall-timeout"},
    )
    tool_call_parser: Literal["hermes", "llama3_json", "mistral", "mistral_v11"] | None = Field(
        None,
        description="How the model writes tool calls (omniserve/tools/registry.py); default: the format its "
        "chat template teaches (<tool_call> JSON: hermes; Llama 3 JSON: llama3_json; [TOOL_CALLS][...]: mistral; "
        "[TOOL_CALLS]name[ARGS]: mistral_v11).",
    )
    reasoning_parser: Literal["auto", "think", "none"] = Field(
        "auto",
        description="How the reply's reasoning is told apart from its answer (returned as reasoning_content). "
        "auto: a <think>...</think> block at the start of the reply when the chat template teaches such blocks; "
        "think: always look for one; none: the reply is all content.",
    )
    ui: bool | None = Field(
        None,
        description="Serve the playground page at / and /playground (chat, media, live metrics; every API call "
        "it makes still needs the key). Default: on when --host is a loopback address, off otherwise; --ui or "
        "--no-ui decides.",
    )
    transcription_instruction: str = Field(
        "Transcribe the audio exactly, and answer with the transcript only.",
        min_length=1,
        description="What /v1/audio/transcriptions asks the model, beside the audio (the request's language and "
        "prompt are appended).",
    )
    translation_instruction: str = Field(
        "Translate the speech in the audio into English, and answer with the translation only.",
        min_length=1,
        description="What /v1/audio/translations asks the model, beside the audio (the request's prompt is appended).",
    )
    transcription_max_tokens: int = Field(
        448,
        gt=0,
        description="Longest transcript or translation, in tokens (the audio endpoints have no max_tokens; 448 is "
        "Whisper's limit for its 30-second window: raise it for long uploads).",
    )
    # /v1/audio/speech (omniserve/speech): present when the checkpoint has a talker
    speech: bool = Field(
        True,
        description="Load the checkpoint's talker and codec for /v1/audio/speech when it has them (a second copy "
        "of the checkpoint's weights in memory); --no-speech leaves them out.",
    )
    speech_max_input: int = Field(
        4096, gt=0, description="Longest /v1/audio/speech input, in characters (4096 is OpenAI's limit)."
    )
    speech_max_seconds: float = Field(
        300.0, gt=0, description="Longest audio one /v1/audio/speech request may produce, in seconds."
    )
    speech_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="Longest a /v1/audio/speech request may take, its wait included (then a 504).",
        json_schema_extra={"flag": "speech-timeout"},
    )
    speech_max_waiting: int = Field(
        8,
        ge=0,
        description="Speech requests that may wait while one is synthesized (one runs at a time); beyond, a 429.",
    )
    # /v1/responses: what ``store: true`` keeps (omniserve/responses_store.py), for previous_response_id and GET
    responses_store: str = Field(
        "sqlite://:memory:",
        description="Where /v1/responses keeps stored responses: sqlite://:memory: (default: in this process's "
        "memory, gone when it stops), sqlite:///PATH (a SQLite file, kept across restarts and shareable by the "
        "processes of one host), postgresql://USER:PASSWORD@HOST:PORT/DB (one database for several replicas; "
        "the responses-postgres extra) or none (nothing stored; previous_response_id is refused).",
    )
    responses_retention_seconds: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        description="Stored responses older than this are deleted (default 30 days, as OpenAI keeps them).",
        json_schema_extra={"flag": "responses-retention"},
    )
    responses_max_stored: int = Field(
        1000,
        gt=0,
        description="Most responses kept; the oldest go first (each may hold its conversation's media).",
    )
    # LoRA adapters served beside the base (omniserve/lora, docs/lora.md)
    lora: dict[str, Path] = Field(
        default_factory=dict,
        description="LoRA adapter to serve: NAME=PATH (a PEFT folder, as omniserve train --lora --no-merge-lora "
        "writes); clients ask for it with model=NAME.",
    )
    lora_file: Path | None = Field(
        None,
        description="File listing LoRA adapters: NAME=PATH lines, or a YAML/JSON mapping of names to paths or list "
        "of {name, path}.",
    )
    allow_runtime_lora: bool = Field(
        False, description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --lora-root)."
    )
    lora_root: Path | None = Field(
        None, description="Folder under which run-time LoRA loads may read (symlinks resolved); others are refused."
    )
    lora_admin_key: str | None = Field(
        None,
        description="If set, the LoRA load/unload endpoints need this bearer key instead of an API key.",
    )
    media: MediaLimits = Field(default_factory=MediaLimits)

    @field_validator("lora_root")
    @classmethod
    def _resolved_root(cls, path: Path | None) -> Path | None:
        """Checked against resolved adapter paths, so it must be resolved itself (``..``, links)."""
        return path.expanduser().resolve() if path is not None else None

    @model_validator(mode="after")
    def _lora_root_given(self) -> ServerConfig:
        if self.allow_runtime_lora and self.lora_root is None:
            raise ValueError("--allow-runtime-lora needs --lora-root: the folder run-time loads may read from")
        return self

    @field_validator("responses_store")
    @classmethod
    def _store_url(cls, url: str) -> str:
        if url == "none" or url.startswith(("sqlite://", "postgresql://", "postgres://")):
            return url
        raise ValueError(f"expected sqlite:///PATH, sqlite://:memory:, postgresql://... or none, not {url!r}")


class DeployOptions(BaseModel):
    """Everything ``omniserve deploy`` can be told: its flags, its ``--config`` file, the Helm values' source.

    The quality gate and ``eval``/``bench`` start servers from this object too (written as the
    ``--config`` file of the server they start), so a server they start is configured exactly as
    the one a user would deploy.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path | None = Field(
        None,
        description="Checkpoint folder, or a built-in model: builtin:omni (the trained tiny demo omni model, the "
        "default) or builtin:omni-speech (the same demo with a tiny random talker and codec: audio output).",
    )
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
    gate_dataset_dir: Path | None = Field(
        None,
        description="With --gate evalscope:NAME: folder holding NAME/, the benchmark's published files "
        "(as omniserve eval --dataset-dir).",
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
        if self.gate_dataset_dir is not None and self.gate is None:
            raise ValueError("--gate-dataset-dir is the data of a --gate evalscope:NAME benchmark: it needs --gate")
        if self.quantize_only and self.quant is None:
            raise ValueError("--quantize-only needs --quant")
        if self.engine_options.ray_address is not None and self.engine != "vllm":
            raise ValueError("--ray-address runs vLLM's workers on a Ray cluster: it needs --engine vllm")
        return self
