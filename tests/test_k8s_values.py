"""A working local `omniserve deploy` command moves to the cluster unchanged.

The local command is parsed by the real CLI parser, turned into the option objects the CLI builds, then
into chart values (omniserve.k8s_values); helm renders those values (validating them against
values.schema.json), every manifest is validated against the Kubernetes schemas, and the pod's arguments
are parsed by the same CLI parser again. Apart from what must differ in a pod (address, paths, how the
API keys arrive), the server in the pod gets exactly the options the local one had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from omniserve.config import DeployOptions
from omniserve.flags import flags_of, parse_argv
from omniserve.k8s_values import (
    API_KEY_SECRET_KEY,
    CHART_VALUES,
    DEFAULT_API_KEY_SECRET,
    DEFAULT_MODELS_CLAIM,
    dump_values_yaml,
    values_from_deploy,
)
from omniserve.k8s_values import REPLACED_IN_THE_POD as REPLACED_FIELDS
from tests.test_helm import (
    KUBE_VERSIONS,
    Helm,
    flag_values,
    init_container,
    kinds,
    mounts,
    parse_with_cli,
    server,
    start_helm,
    validate_manifest,
    volume,
)

SECRET_KEY_TEXT = "sk-live-abcdef123456"

# Every `omniserve deploy` flag travels to the pod as a chart value of its own (k8s_values.CHART_VALUES), is
# replaced there on purpose (k8s_values.REPLACED_IN_THE_POD), or travels in server.extraArgs.
DEPLOY_FLAGS = flags_of(DeployOptions)
TRAVELS = {flag.name for flag in DEPLOY_FLAGS if ".".join(flag.path) in CHART_VALUES} - {"model"}
REPLACED_IN_THE_POD = {
    flag.name: REPLACED_FIELDS[".".join(flag.path)] for flag in DEPLOY_FLAGS if ".".join(flag.path) in REPLACED_FIELDS
} | {
    "model": "/models/<folder> on a volume, or the built-in model",
    "config": "the chart passes every option as a flag",
}

LOCAL_COMMAND = [
    "--engine", "transformers",
    "--host", "127.0.0.1",
    "--port", "9001",
    "--served-model-name", "mine",
    "--api-key", SECRET_KEY_TEXT,
    "--max-concurrency", "3",
    "--max-queue", "0",
    "--max-model-len", "4096",
    "--max-n", "2",
    "--dtype", "bfloat16",
    "--device", "cuda",
    "--engine-arg", "tensor_parallel_size=2",
    "--engine-arg", "attn_implementation=sdpa",
    "--allowed-media-domains", "images.example.org",
    "--allowed-media-domains", "cdn.example.net",
    "--allow-private-media-addresses",
    "--allowed-local-media-path", "/srv/media",
    "--max-media-bytes", "1048576",
    "--max-image-pixels", "1000000",
    "--video-fps", "0.5",
    "--max-video-frames", "8",
    "--max-video-seconds", "30.5",
    "--max-audio-seconds", "12.25",
    "--media-fetch-timeout", "2.5",
    "--max-request-bytes", "2097152",
    "--cors-origin", "https://app.example.com",
    "--log-level", "debug",
]  # fmt: skip


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return start_helm(tmp_path_factory)


def values_for(
    argv: list[str], *, quant: str | None = None, gate: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Chart values for a local command, from the options object `omniserve deploy` builds from these flags."""
    argv = [*argv, *(["--quant", quant] if quant else []), *(["--gate", gate] if gate else [])]
    options = parse_argv(DeployOptions, [*argv, *(["--force"] if force else [])], what="deploy")
    return values_from_deploy(options)


def render_dumped(helm: Helm, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    """Render the YAML a user would get from `--print-k8s`, validating every manifest on the way."""
    path = tmp_path / "values.yaml"
    path.write_text(dump_values_yaml(values), encoding="utf-8")
    docs = helm.template(path)
    for doc in docs:
        for version in KUBE_VERSIONS:
            validate_manifest(doc, version)
    return docs


def test_every_deploy_flag_is_accounted_for() -> None:
    import typer.main

    from omniserve.cli import app

    command = typer.main.get_command(app).commands["deploy"]  # type: ignore[attr-defined]
    names = {param.name for param in command.params}
    assert names == {flag.name for flag in DEPLOY_FLAGS} | {"config"}, "deploy's flags are DeployOptions' fields"
    paths = {".".join(flag.path) for flag in DEPLOY_FLAGS}
    assert CHART_VALUES | set(REPLACED_FIELDS) <= paths, "k8s_values names an option that no longer exists"


def test_a_flag_without_a_chart_value_travels_in_extra_args(
    helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new deploy option reaches the pod with no edit to k8s_values or the chart: as server.extraArgs.

    Simulated by taking chart values away from a few options of each kind (scalar, bool, mapping); the
    dedicated values are still written, and the pod's later extraArgs flag must win over them.
    """
    import omniserve.k8s_values as k8s

    generic = {
        "engine_options.max_n": ["--max-n", "3"],
        "server.max_request_bytes": ["--max-request-bytes", "4096"],
        "server.media.allow_private_media_addresses": ["--allow-private-media-addresses"],
        "server.media.limit_media_per_request": ["--limit-media-per-request", "image=2,audio=1"],
        "server.drain_timeout_seconds": ["--drain-timeout", "12.5"],
    }
    monkeypatch.setattr(k8s, "CHART_VALUES", k8s.CHART_VALUES - set(generic))
    argv = ["--model", str(tmp_path / "m"), *(word for words in generic.values() for word in words)]
    local = parse_argv(DeployOptions, argv, what="deploy")
    values = values_from_deploy(local)
    assert values["server"]["extraArgs"], "the options without a chart value went to extraArgs"
    pod = parse_argv(DeployOptions, server(render_dumped(helm, values, tmp_path))["args"], what="pod")
    for path in generic:
        assert k8s._field(pod, tuple(path.split("."))) == k8s._field(local, tuple(path.split("."))), path


def test_local_command_runs_unchanged_in_the_pod(helm: Helm, tmp_path: Path) -> None:
    local = parse_with_cli([*LOCAL_COMMAND, "--model", str(tmp_path / "my-ckpt")])
    docs = render_dumped(helm, values_for([*LOCAL_COMMAND, "--model", str(tmp_path / "my-ckpt")]), tmp_path)
    pod = parse_with_cli(server(docs)["args"])

    assert pod["host"] == "0.0.0.0"
    assert pod["model"] == Path("/models/my-ckpt")
    assert not pod["api_key"]
    assert pod["api_key_file"] == Path(f"/etc/omniserve/api-keys/{API_KEY_SECRET_KEY}")
    same = TRAVELS - {"engine_arg", "quant", "gate", "force"}
    assert {name: pod[name] for name in same if name in pod} == {name: local[name] for name in same if name in local}
    assert sorted(pod["engine_arg"]) == sorted(local["engine_arg"])  # the chart orders them by key


def test_gpus_follow_the_engine_args(helm: Helm, tmp_path: Path) -> None:
    docs = render_dumped(helm, values_for([*LOCAL_COMMAND, "--model", str(tmp_path / "m")]), tmp_path)
    container = server(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # tensor_parallel_size=2
    assert "/dev/shm" in mounts(container)


def test_api_keys_are_not_copied_into_values(helm: Helm, tmp_path: Path) -> None:
    values = values_for([*LOCAL_COMMAND, "--model", str(tmp_path / "m")])
    text = dump_values_yaml(values)
    assert SECRET_KEY_TEXT not in text
    assert values["auth"] == {"existingSecret": DEFAULT_API_KEY_SECRET, "secretKey": API_KEY_SECRET_KEY}
    assert (
        f"kubectl create secret generic {DEFAULT_API_KEY_SECRET} --from-file={API_KEY_SECRET_KEY}=./api-keys.txt"
        in text
    )
    docs = render_dumped(helm, values, tmp_path)
    assert "Secret" not in kinds(docs)
    assert SECRET_KEY_TEXT not in yaml.safe_dump_all(docs)
    assert volume(docs, "api-keys")["secret"]["secretName"] == DEFAULT_API_KEY_SECRET


def test_without_keys_there_is_no_secret(tmp_path: Path) -> None:
    values = values_for(["--model", str(tmp_path / "m")])
    assert values["auth"]["existingSecret"] == ""
    assert "kubectl create secret" not in dump_values_yaml(values)


def test_the_defaults_render_and_pass_the_cli(helm: Helm, tmp_path: Path) -> None:
    """The plainest local command (`omniserve deploy --model DIR`): CPU, no GPU, the CLI's defaults."""
    local = parse_with_cli(["--model", str(tmp_path / "ckpt")])
    docs = render_dumped(helm, values_for(["--model", str(tmp_path / "ckpt")]), tmp_path)
    container = server(docs)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["image"].endswith("-cpu")
    pod = parse_with_cli(container["args"])
    assert pod["served_model_name"] == "ckpt", "the folder name the local server would have used"
    for name in TRAVELS - {"served_model_name", "quant", "gate", "force"}:
        if name in local:
            assert pod[name] == local[name], name


def test_builtin_model_is_built_in_the_pod(helm: Helm, tmp_path: Path) -> None:
    values = values_for([])  # no --model: the built-in demo model, under its own name
    assert values["model"] == {"source": "builtin", "servedModelName": "tiny-omni-demo"}
    docs = render_dumped(helm, values, tmp_path)
    assert "--model" not in server(docs)["args"]


def test_a_named_builtin_model_is_the_pods_model_too(helm: Helm, tmp_path: Path) -> None:
    """``--model builtin:omni-speech`` is a built-in, not a folder to copy onto a claim: the pod builds it too."""
    values = values_for(["--model", "builtin:omni-speech"])
    assert values["model"] == {"source": "builtin", "builtin": "omni-speech", "servedModelName": "tiny-omni-speech"}
    pod = parse_with_cli(server(render_dumped(helm, values, tmp_path))["args"])
    assert str(pod["model"]) == "builtin:omni-speech" and pod["served_model_name"] == "tiny-omni-speech"


def test_a_local_folder_becomes_a_claim_the_header_explains(tmp_path: Path) -> None:
    text = dump_values_yaml(values_for(["--model", str(tmp_path / "qwen-7b")]))
    assert f"PersistentVolumeClaim '{DEFAULT_MODELS_CLAIM}', in the folder 'qwen-7b'" in text
    values = yaml.safe_load(text)
    assert values["model"]["pvc"]["claimName"] == DEFAULT_MODELS_CLAIM and values["model"]["path"] == "qwen-7b"


def test_quantization_travels_and_keeps_its_cache(helm: Helm, tmp_path: Path) -> None:
    values = values_for(["--model", str(tmp_path / "m"), "--engine", "vllm"], quant="awq")
    assert values["quantization"] == {"method": "awq", "mode": "onStart", "gate": "", "force": False}
    assert values["persistence"] == {"enabled": True}
    assert values["accelerator"]["count"] == 1, "vLLM runs on a GPU"
    docs = render_dumped(helm, values, tmp_path)
    args = server(docs)["args"]
    assert flag_values(args, "--quant") == ["awq"]
    assert flag_values(args, "--engine") == ["vllm"]
    assert "--gate" not in args and "--force" not in args
    assert "PersistentVolumeClaim" in kinds(docs)


def test_quality_gate_travels_to_the_server_and_the_init_step(helm: Helm, tmp_path: Path) -> None:
    local = parse_with_cli(["--model", str(tmp_path / "m"), "--gate", "omni-synth:1.5", "--force"])
    values = values_for(["--model", str(tmp_path / "m")], quant="gptq", gate=local["gate"], force=local["force"])
    assert values["quantization"]["gate"] == "omni-synth:1.5" and values["quantization"]["force"] is True
    docs = render_dumped(helm, values, tmp_path)
    pod = parse_with_cli(server(docs)["args"])
    assert (pod["quant"], pod["gate"], pod["force"]) == ("gptq", "omni-synth:1.5", True)

    values["quantization"]["mode"] = "initContainer"
    docs = render_dumped(helm, values, tmp_path)
    step = init_container(docs, "quantize")
    assert step["args"][:2] == ["deploy", "--quantize-only"]
    # the init step gates with the server's own flags, so the server finds the gate's scores cached
    assert step["args"][2:] == server(docs)["args"]


@pytest.mark.parametrize(
    ("engine", "argv", "gpus"),
    [
        ("transformers", [], 0),
        ("transformers", ["--device", "cuda:1"], 1),
        ("vllm", [], 1),
        ("sglang", ["--engine-arg", "tensor_parallel_size=2", "--engine-arg", "pipeline_parallel_size=2"], 4),
    ],
)
def test_gpu_count(engine: str, argv: list[str], gpus: int, tmp_path: Path) -> None:
    values = values_for(["--model", str(tmp_path / "m"), "--engine", engine, *argv])
    assert values["accelerator"]["count"] == gpus
    assert values.get("shm", {}).get("enabled", False) == (gpus > 1)


def test_port_zero_becomes_the_chart_port(tmp_path: Path) -> None:
    assert values_for(["--model", str(tmp_path / "m"), "--port", "0"])["server"]["port"] == 8000


@pytest.mark.parametrize(
    ("argv", "quant", "message"),
    [
        (["--engine-arg", "tensor_parallel_size=two"], None, "tensor_parallel_size must be a whole number"),
        (["--engine-arg", "pipeline_parallel_size=0"], None, "pipeline_parallel_size must be at least 1"),
        ([], "int3", "'int3' is not one of 'gptq', 'awq', 'fp8', 'fp8-static'"),
    ],
)
def test_options_no_pod_could_run_are_refused(argv: list[str], quant: str | None, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        values_for(["--model", str(tmp_path / "m"), *argv], quant=quant)


def test_a_gate_without_quantization_is_refused_by_values_and_chart(helm: Helm, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--gate .* needs --quant"):
        values_for(["--model", str(tmp_path / "m")], gate="omni-synth")
    with pytest.raises(ValueError, match=r"--force .* needs --gate"):
        values_for(["--model", str(tmp_path / "m")], quant="awq", force=True)
    assert "quantization.gate needs quantization.method" in helm.template_error(sets=["quantization.gate=omni-synth"])
    assert "quantization.force overrides a failed quality gate" in helm.template_error(
        sets=["quantization.method=awq", "quantization.force=true"]
    )


def test_local_media_path_needs_a_mount_and_the_header_says_so(tmp_path: Path) -> None:
    text = dump_values_yaml(values_for(["--model", str(tmp_path / "m"), "--allowed-local-media-path", "/srv/media"]))
    assert "media.allowedLocalPath '/srv/media' is a path inside the pod" in text


# --- one model over several nodes: pipeline parallel over Ray becomes the chart's multi-node group ---------

RAY_COMMAND = [
    "--engine", "vllm",
    "--engine-arg", "tensor_parallel_size=8",
    "--engine-arg", "pipeline_parallel_size=2",
    "--engine-arg", "distributed_executor_backend=ray",
    "--ray-address", "10.0.0.5:6379",
]  # fmt: skip


@pytest.mark.parametrize(
    "ray_flags",
    [
        ["--engine-arg", "distributed_executor_backend=ray", "--ray-address", "10.0.0.5:6379"],
        ["--ray-address", "10.0.0.5:6379"],  # implies the Ray backend
        ["--engine-arg", "distributed_executor_backend=ray"],  # vLLM's own Ray on the leader
    ],
)
def test_pipeline_parallel_over_ray_becomes_a_multinode_group(helm: Helm, tmp_path: Path, ray_flags: list[str]) -> None:
    from tests.test_helm_scaleout import validate_any

    argv = ["--model", str(tmp_path / "big"), "--engine", "vllm", "--engine-arg", "tensor_parallel_size=8",
            "--engine-arg", "pipeline_parallel_size=2", *ray_flags]  # fmt: skip
    values = values_for(argv)
    assert values["multiNode"] == {"enabled": True, "size": 2}, "one pipeline stage per pod"
    assert values["accelerator"]["count"] == 8, "tensor parallel over each pod's GPUs"
    text = dump_values_yaml(values)
    assert "LeaderWorkerSet controller" in text and "--ray-address is not used in the pods" in text
    assert "--ray-address" not in values["server"]["extraArgs"], "the pods' Ray head is the leader's own"

    path = tmp_path / "values.yaml"
    path.write_text(text, encoding="utf-8")
    docs = helm.template(path)
    for doc in docs:
        for version in KUBE_VERSIONS:
            validate_any(doc, version)
    assert "Deployment" not in kinds(docs)
    [lws] = [doc for doc in docs if doc["kind"] == "LeaderWorkerSet"]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    [leader] = template["leaderTemplate"]["spec"]["containers"]
    [worker] = template["workerTemplate"]["spec"]["containers"]
    for container in (leader, worker):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    pod = parse_with_cli(leader["args"])
    assert pod["engine"] == "vllm" and pod["model"] == Path("/models/big") and pod.get("ray_address") is None
    assert {"tensor_parallel_size=8", "pipeline_parallel_size=2", "distributed_executor_backend=ray"} <= set(
        flag_values(leader["args"], "--engine-arg")
    )


TP2_PP2 = ["--engine-arg", "tensor_parallel_size=2", "--engine-arg", "pipeline_parallel_size=2"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "vllm", *TP2_PP2],
        ["--engine", "vllm", *TP2_PP2, "--engine-arg", "distributed_executor_backend=mp"],
        ["--engine", "vllm", "--engine-arg", "tensor_parallel_size=4", "--ray-address", "10.0.0.5:6379"],
        ["--engine", "sglang", *TP2_PP2],
    ],
)
def test_parallel_within_one_node_stays_one_pod(argv: list[str], tmp_path: Path) -> None:
    """Without pipeline stages over Ray, the GPUs are one pod's (no stage to place on another node)."""
    values = values_for(["--model", str(tmp_path / "m"), *argv])
    assert "multiNode" not in values
    assert values["accelerator"]["count"] == 4 and values["shm"]["enabled"]


@pytest.mark.parametrize(
    ("argv", "quant", "message"),
    [
        (RAY_COMMAND, None, r"give --model \(the built-in demo model only exists on the pod that builds it\)"),
        (["--model", "m", *RAY_COMMAND], "awq", r"Quantize first \(--quantize-only\)"),
    ],
)
def test_a_multinode_group_the_chart_would_refuse_is_refused_here(
    argv: list[str], quant: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        values_for(argv, quant=quant)
