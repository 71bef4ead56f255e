"""Helm values for ``helm/omniserve`` equivalent to a local ``omniserve deploy``.

A user who has a command that works on one machine should get the same server on a cluster without
re-deriving every limit by hand: :func:`values_from_deploy` turns the option objects the CLI builds
into chart values, and :func:`dump_values_yaml` writes them with the few steps the cluster still
needs from a person (a Secret for the API keys, the checkpoint on a volume).

Four things deliberately do not travel:

- API keys. Values files end up in git, CI logs and ``helm get values``; the values name a Secret and
  the header says how to create it. The chart mounts it and passes ``--api-key-file``.
- The host address. In a pod the server binds ``0.0.0.0`` and the Service is the way in.
- The Ray address. A command that shards a model over Ray nodes (pipeline parallel) becomes the chart's
  multi-node mode, whose leader pod starts its group's own Ray head.
- Local paths. The checkpoint folder becomes ``/models/<folder name>`` on a PersistentVolumeClaim
  (the header says so); a local quantization cache is replaced by the chart's cache volume.

Importing this module stays cheap (pydantic and PyYAML only), like the rest of the CLI's imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from omniserve.config import DeployOptions, EngineOptions, ServerConfig
from omniserve.flags import OptionError, flags_of, to_argv
from omniserve.models.demo import builtin_name, builtin_served_name

DEFAULT_API_KEY_SECRET = "omniserve-api-keys"
"""Secret the values refer to when the local command had API keys."""

API_KEY_SECRET_KEY = "api-keys"
"""Key inside that Secret holding the keys, one per line (the format of ``--api-key-file``)."""

DEFAULT_MODELS_CLAIM = "omniserve-models"
"""PersistentVolumeClaim the values expect the checkpoint on when the local command named a folder."""

DEFAULT_ADAPTERS_CLAIM = "omniserve-adapters"
"""PersistentVolumeClaim the values expect LoRA adapters on (mounted at /adapters) when the command served any."""

GPU_ENGINES = frozenset({"vllm", "sglang", "lmdeploy"})
"""Engines that only run on a GPU, so a pod for them needs at least one."""

#: Deploy options with a chart value of their own (field paths of ``DeployOptions``). Every other flag
#: travels in ``server.extraArgs`` when it differs from its default, so a new deploy option reaches the pod
#: without an edit here; a dedicated value is for what the chart itself reads (probes, GPUs, grace period).
CHART_VALUES = frozenset(
    {
        "model",
        "served_model_name",
        "engine",
        "engine_options.engine_args",
        "engine_options.dtype",
        "engine_options.device",
        "engine_options.max_model_len",
        "engine_options.max_concurrency",
        "engine_options.max_queue",
        "engine_options.max_n",
        "engine_options.max_loras",
        "engine_options.max_lora_rank",
        "server.lora",
        "server.lora_file",
        "server.allow_runtime_lora",
        "server.lora_root",
        "quant",
        "gate",
        "force",
        "log_level",
        "server.port",
        "server.max_request_bytes",
        "server.cors_origins",
        "server.drain_delay_seconds",
        "server.drain_timeout_seconds",
        "server.stall_timeout_seconds",
        "server.media.allowed_media_domains",
        "server.media.allow_private_media_addresses",
        "server.media.allowed_local_media_path",
        "server.media.max_media_bytes",
        "server.media.max_image_pixels",
        "server.media.video_fps",
        "server.media.max_video_frames",
        "server.media.max_video_seconds",
        "server.media.max_audio_seconds",
        "server.media.fetch_timeout_seconds",
        "server.media.limit_media_per_request",
        "server.media.max_pixels_per_request",
        "server.media.max_audio_seconds_per_request",
        "server.media.max_concurrent_decodes",
        "server.media.max_decoded_media_bytes",
        "server.media.media_wait_timeout_seconds",
        "server.media.media_decode_timeout_seconds",
    }
)

#: Deploy options deliberately not carried to the pod, and what replaces each there.
REPLACED_IN_THE_POD: dict[str, str] = {
    "server.host": "the pod binds 0.0.0.0",
    "server.api_keys": "a Secret mounted as --api-key-file",
    "api_key_file": "a Secret mounted as --api-key-file",
    "quant_cache_dir": "the chart's cache volume",
    "print_k8s": "prints these values",
    "quantize_only": "the chart's quantize init step passes it itself",
    "engine_options.ray_address": "multiNode: the group's Ray head, started on the leader, where vLLM finds it",
    "server.lora_admin_key": "not carried (a secret): run-time LoRA loads in the pod are guarded by the API keys",
}

SHUTDOWN_MARGIN_SECONDS = 25
"""Grace beyond the drain (delay + timeout): the cut-off streams' last events, the engine's stop, the exit.
The chart refuses a margin under 10 s; with the default drain this gives the chart's default of 60 s."""


def values_from_deploy(
    options: DeployOptions,
    *,
    api_key_secret: str = DEFAULT_API_KEY_SECRET,
    models_claim: str = DEFAULT_MODELS_CLAIM,
) -> dict[str, Any]:
    """Chart values that make the pod run the same ``omniserve deploy`` as ``options``.

    Takes the very object ``omniserve deploy`` validated from its flags (so the values are as checked
    as the local server's options, combinations included). Every limit is written out, even at its
    default, so the cluster keeps behaving like the local command if a default changes later.
    """
    engine_options, server_config = options.engine_options, options.server
    engine = options.engine
    media = server_config.media
    gpus = _gpus_needed(engine, engine_options)
    nodes = multi_node_size(options)
    values: dict[str, Any] = {
        "model": _model_values(options, models_claim),
        "engine": {
            "name": engine,
            "args": dict(engine_options.engine_args),
            "dtype": engine_options.dtype,
            "device": engine_options.device,
            "maxModelLen": engine_options.max_model_len,
            "maxConcurrency": engine_options.max_concurrency,
            "maxQueue": engine_options.max_queue,
            "maxN": engine_options.max_n,
        },
        "quantization": {
            "method": options.quant or "",
            "mode": "onStart",
            "gate": options.gate or "",
            "force": options.force,
        },
        "server": {
            "port": server_config.port if server_config.port else 8000,  # 0 ("any free port") has no pod meaning
            "maxRequestBytes": server_config.max_request_bytes,
            "corsOrigins": list(server_config.cors_origins),
            "logLevel": options.log_level.lower(),
            "drainDelaySeconds": server_config.drain_delay_seconds,
            "drainTimeoutSeconds": server_config.drain_timeout_seconds,
            "stallTimeoutSeconds": server_config.stall_timeout_seconds,
        },
        # Kubernetes kills the pod this long after SIGTERM: the whole drain, then time to stop the engine
        "terminationGracePeriodSeconds": grace_period_seconds(server_config),
        "media": {
            "allowedDomains": list(media.allowed_media_domains or ()),
            "allowPrivateAddresses": media.allow_private_media_addresses,
            "allowedLocalPath": str(media.allowed_local_media_path) if media.allowed_local_media_path else "",
            "maxBytes": media.max_media_bytes,
            "maxImagePixels": media.max_image_pixels,
            "videoFps": media.video_fps,
            "maxVideoFrames": media.max_video_frames,
            "maxVideoSeconds": media.max_video_seconds,
            "maxAudioSeconds": media.max_audio_seconds,
            "fetchTimeoutSeconds": media.fetch_timeout_seconds,
            # only the kinds the command named, as the command named them: the others keep the defaults
            "limitPerRequest": dict(media.limit_media_per_request),
            "maxPixelsPerRequest": media.max_pixels_per_request,
            "maxAudioSecondsPerRequest": media.max_audio_seconds_per_request,
            "maxConcurrentDecodes": media.max_concurrent_decodes,
            "maxDecodedBytes": media.max_decoded_media_bytes,
            "waitTimeoutSeconds": media.media_wait_timeout_seconds,
            "decodeTimeoutSeconds": media.media_decode_timeout_seconds,
        },
        "auth": {
            # never the keys themselves: only where the cluster keeps them
            "existingSecret": api_key_secret if server_config.api_keys or options.api_key_file else "",
            "secretKey": API_KEY_SECRET_KEY,
        },
        "accelerator": {"count": gpus, "resourceName": "nvidia.com/gpu"},
        "lora": _lora_values(options),
    }
    values["server"]["extraArgs"] = extra_args(options)
    if nodes > 1:  # one pipeline stage per pod, tensor parallel over each pod's GPUs (the chart checks the product)
        values["multiNode"] = {"enabled": True, "size": nodes}
        values["accelerator"]["count"] = gpus // nodes
    if gpus > 1:  # tensor-parallel workers exchange tensors through /dev/shm
        values["shm"] = {"enabled": True, "sizeLimit": "8Gi"}
    if options.quant:  # quantizing is slow: keep the result across restarts
        values["persistence"] = {"enabled": True}
    return values


def extra_args(options: DeployOptions) -> list[str]:
    """The flags of ``options`` that have no chart value of their own, where they differ from the defaults."""
    defaults = DeployOptions()
    args: list[str] = []
    for flag in flags_of(DeployOptions):
        key = ".".join(flag.path)
        if key in CHART_VALUES or key in REPLACED_IN_THE_POD:
            continue
        value = _field(options, flag.path)
        if value != _field(defaults, flag.path):
            args += to_argv(flag, value)
    return args


def _field(options: DeployOptions, path: tuple[str, ...]) -> Any:
    value: Any = options
    for part in path:
        value = getattr(value, part)
    return value


def grace_period_seconds(server: ServerConfig) -> int:
    """``terminationGracePeriodSeconds`` for a server that drains as ``server`` says (``server/drain.py``)."""
    return math.ceil(server.drain_delay_seconds + server.drain_timeout_seconds) + SHUTDOWN_MARGIN_SECONDS


def dump_values_yaml(values: Mapping[str, Any]) -> str:
    """The values as a YAML file whose header says what a person still has to do on the cluster.

    The header is derived from the values themselves (a Secret to create when ``auth`` names one, a
    volume to fill when the model comes from a claim), so it stays true for hand-edited values too.
    """
    lines = [
        "# omniserve chart values, equivalent to a local `omniserve deploy` command.",
        "# Install:  helm install omniserve helm/omniserve -f values.yaml",
        "# The server binds 0.0.0.0 inside the pod; reach it through the Service (see the install notes).",
        "# Size resources (and accelerator.count) for the model before installing.",
    ]
    sections = ("auth", "model", "multiNode", "lora", "media")
    auth, model, multi, lora, media = (values.get(section) or {} for section in sections)
    models_claim = (model.get("pvc") or {}).get("claimName", DEFAULT_MODELS_CLAIM)
    adapters_claim = (lora.get("volume") or {}).get("claimName")
    # what is left to do on the cluster, one note per case: (whether it applies, its lines); "#" sets notes apart
    notes: list[tuple[Any, ...]] = [
        (
            auth.get("existingSecret"),
            "API keys are not copied into values. Create the Secret they are read from, one key per line:",
            f"  kubectl create secret generic {auth.get('existingSecret')} "
            f"--from-file={auth.get('secretKey', API_KEY_SECRET_KEY)}=./api-keys.txt",
        ),
        (
            model.get("source") == "pvc",
            f"The checkpoint must be on the PersistentVolumeClaim {models_claim!r}, "
            f"in the folder {model.get('path', '')!r}",
            "(mounted read-only at /models). Or set model.source to download (an init container copies it",
            "from object storage) or hostPath.",
        ),
        (
            multi.get("enabled"),
            f"One model over {multi.get('size')} pods per group (multiNode): a LeaderWorkerSet, which needs the",
            "LeaderWorkerSet controller (https://github.com/kubernetes-sigs/lws). The leader starts the Ray head",
            "and omniserve, the workers join it; the local --ray-address is not used in the pods.",
        ),
        (
            adapters_claim,
            f"LoRA adapters must be on the PersistentVolumeClaim {adapters_claim!r} "
            "(mounted read-only at /adapters), each",
            "folder at its lora.adapters path; run-time loads (lora.allowRuntime) may read anywhere on it.",
        ),
        (
            media.get("allowedLocalPath"),
            f"media.allowedLocalPath {media.get('allowedLocalPath')!r} is a path inside the pod: mount it with",
            "extraVolumes and extraVolumeMounts.",
        ),
    ]
    for applies, *note in notes:
        if applies:
            lines += ["#", *(f"# {line}" for line in note)]
    body = yaml.safe_dump(dict(values), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "\n".join(lines) + "\n" + body


def _model_values(options: DeployOptions, models_claim: str) -> dict[str, Any]:
    """Where the pod finds the checkpoint; the served name is kept explicit because the folder the
    pod sees (``/models/...``) need not have the local folder's name, which is the CLI's default."""
    builtin = builtin_name(options.model)
    if builtin is not None:  # a built-in model, which the pod has in its image (or builds at start)
        values: dict[str, Any] = {"source": "builtin"}
        if builtin != "omni":
            values["builtin"] = builtin
        values["servedModelName"] = options.served_model_name or builtin_served_name(builtin)
        return values
    return {
        "source": "pvc",
        "path": options.model.resolve().name,
        "servedModelName": options.served_model_name or options.model.resolve().name,
        "pvc": {"claimName": models_claim, "readOnly": True},
    }


def _lora_values(options: DeployOptions) -> dict[str, Any]:
    """LoRA adapters on the chart's adapters volume (/adapters): each under its path relative to
    ``--lora-root`` when it lies there (run-time loads then name the same layout), else its folder's name."""
    server_config = options.server
    adapters: dict[str, Path] = {}
    if server_config.lora or server_config.lora_file:
        from omniserve.lora.serving import configured_adapters  # reads --lora-file: only when adapters are given

        adapters = configured_adapters(server_config)
    root = server_config.lora_root
    entries, taken = [], set()
    for name, path in adapters.items():
        resolved = path.expanduser().resolve()
        inside = root is not None and resolved.is_relative_to(root)
        relative = resolved.relative_to(root).as_posix() if inside and resolved != root else resolved.name
        relative = relative if relative not in taken else name  # two folders of the same name
        taken.add(relative)
        entries.append({"name": name, "path": relative})
    uses_volume = bool(entries) or server_config.allow_runtime_lora
    return {
        "adapters": entries,
        "volume": {"claimName": DEFAULT_ADAPTERS_CLAIM if uses_volume else "", "source": {}},
        "maxLoras": options.engine_options.max_loras,
        "maxLoraRank": options.engine_options.max_lora_rank,
        "allowRuntime": server_config.allow_runtime_lora,
        "root": "",  # --lora-root is the adapters volume itself in the pod
    }


def multi_node_size(options: DeployOptions) -> int:
    """Pods per group (the chart's ``multiNode.size``) for a command that shards one model on Ray: vLLM with
    the Ray backend (``--engine-arg distributed_executor_backend=ray`` or ``--ray-address``) and
    ``pipeline_parallel_size`` > 1 spreads its pipeline stages over that many pods; otherwise 1 (one pod).

    What the chart would refuse for such a group is refused here, naming the local flags to change.
    """
    engine_options = options.engine_options
    args = engine_options.engine_args
    over_ray = args.get("distributed_executor_backend") == "ray" or engine_options.ray_address is not None
    stages = _positive_int(args, "pipeline_parallel_size")
    if options.engine != "vllm" or not over_ray or stages < 2:
        return 1
    if options.model is None:
        raise OptionError(
            "pipeline parallel over Ray spreads the model over several pods, which all load it from a volume: "
            "give --model (the built-in demo model only exists on the pod that builds it)"
        )
    if options.quant:
        raise OptionError(
            "pipeline parallel over Ray with --quant: the workers would need the quantized weights the leader "
            "writes into its own cache. Quantize first (--quantize-only) and serve the folder it prints"
        )
    return stages


def _gpus_needed(engine: str, engine_options: EngineOptions) -> int:
    """GPUs the pod must request: tensor x pipeline parallel when the engine args say so, one for a
    GPU-only engine or a CUDA device, none otherwise (the chart refuses a count that disagrees)."""
    args = engine_options.engine_args
    parallel = _positive_int(args, "tensor_parallel_size") * _positive_int(args, "pipeline_parallel_size")
    if parallel > 1:
        return parallel
    if engine in GPU_ENGINES or engine_options.device.startswith("cuda"):
        return 1
    return 0


def _positive_int(engine_args: Mapping[str, str], name: str) -> int:
    """A parallelism engine arg as a GPU count; refused here rather than as a chart error later."""
    text = engine_args.get(name)
    if text is None:
        return 1
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"--engine-arg {name} must be a whole number, got {text!r}") from None
    if value < 1:
        raise OptionError(f"--engine-arg {name} must be at least 1, got {value}")
    return value
