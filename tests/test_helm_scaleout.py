"""The chart's scale-out renderings: multi-node (LeaderWorkerSet), KEDA autoscaling, inference-gateway pool.

Each rendering is checked the way tests/test_helm.py checks the single-pod one: `helm lint --strict`, every
built-in object against the Kubernetes JSON schemas (kubernetes-validate, strict), and here also every
custom resource against the `openAPIV3Schema` of its CRD, vendored under tests/fixtures/crds/ (sources and
versions in the README there; nothing is fetched at test time), made strict the way kubernetes-validate is:
an object field the CRD does not define fails, where the API server would silently prune it. The pod
templates inside a LeaderWorkerSet are also validated as built-in PodTemplates. The scripts the leader and
workers run are executed for real, with `ray` and `omniserve` stand-ins, to prove the arguments arrive intact.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm import (
    CHART,
    KUBE_VERSIONS,
    ROOT,
    Helm,
    flag_values,
    kinds,
    one,
    parse_with_cli,
    start_helm,
    validate_manifest,
)

CRDS = ROOT / "tests" / "fixtures" / "crds"
MULTINODE_EXAMPLE = CHART / "examples" / "multinode-2x8.yaml"
METRICS_SOURCE = ROOT / "omniserve" / "server" / "metrics.py"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
LWS_API = "leaderworkerset.x-k8s.io/v1"

KEDA = {"keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS}}}
POOL = {
    "inferencePool": {
        "enabled": True,
        "objectives": [{"name": "interactive", "priority": 10}, {"name": "batch", "priority": -10}],
    }
}
# a vLLM single pod (the KEDA and pool renderings need a GPU engine to be realistic, not to render)
GPU_SINGLE = {
    "engine": {"name": "vllm", "args": {"tensor_parallel_size": 2}},
    "accelerator": {"count": 2},
    "model": {"source": "pvc", "pvc": {"claimName": "models"}, "path": "m"},
}
# a small multi-node group, for the refusals (the documented example is the 2 x 8 one)
MULTI = {
    "multiNode": {"enabled": True, "size": 2},
    "engine": {"name": "vllm", "args": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}},
    "accelerator": {"count": 2},
    "model": {"source": "pvc", "pvc": {"claimName": "models"}, "path": "m"},
}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    """Values deep-merged left to right, as helm merges several -f files."""
    out: dict[str, Any] = {}

    def into(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                into(dst[key], value)
            else:
                dst[key] = copy.deepcopy(value)

    for part in parts:
        into(out, part)
    return out


SCENARIOS: dict[str, list[Path | dict[str, Any]]] = {
    "multinode-2x8": [MULTINODE_EXAMPLE],
    "keda": [GPU_SINGLE, KEDA],
    "inference-pool": [GPU_SINGLE, POOL],
    "multinode-keda-pool": [MULTINODE_EXAMPLE, KEDA, POOL],
}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return start_helm(tmp_path_factory)


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    return {name: helm.template(*values) for name, values in SCENARIOS.items()}


# --- CRD schemas ------------------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown object fields refused (the API server prunes them silently, so a typo
    would vanish instead of failing); objects that keep unknown fields on purpose stay open."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> a jsonschema validator for every served version of every vendored CRD."""
    import jsonschema

    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        # libyaml when present: the LeaderWorkerSet CRD is 1.3 MB, ten times slower to parse in pure Python
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                jsonschema.Draft7Validator.check_schema(schema)
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def validate_custom_resource(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if the object does not fit its vendored CRD's schema."""
    validator = _crd_validators().get((doc["apiVersion"], doc["kind"]))
    assert validator is not None, f"no vendored CRD for {doc['apiVersion']} {doc['kind']}"
    validator.validate(doc)
    if doc["kind"] == "LeaderWorkerSet":
        # the CRD embeds the pod template schema; the built-in one also checks quantities and names
        template = doc["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}}
            validate_manifest({**pod_template, "template": template[role]}, KUBE_VERSIONS[-1])


def validate_any(doc: dict[str, Any], kube_version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in _crd_validators():
        validate_custom_resource(doc)
    else:
        validate_manifest(doc, kube_version)


def test_vendored_crds_are_documented_and_pinned() -> None:
    """Each CRD file is named in the README with its repository, path and release tag."""
    readme = (CRDS / "README.md").read_text(encoding="utf-8")
    files = sorted(path.name for path in CRDS.glob("*.yaml"))
    assert files == [
        "inference.networking.k8s.io_inferencepools.yaml",
        "keda.sh_scaledobjects.yaml",
        "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
        "llm-d.ai_inferenceobjectives.yaml",
    ]
    for name in files:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        digest = hashlib.sha256((CRDS / name).read_bytes()).hexdigest()
        assert f"`{digest}`" in row, f"{name} differs from the upstream copy the README records"
    for source in (
        "kubernetes-sigs/lws",
        "kedacore/keda",
        "kubernetes-sigs/gateway-api-inference-extension",
        "llm-d/llm-d-router",
    ):
        assert source in readme
    for tag in ("v0.10.0", "v2.20.2", "v1.6.0"):
        assert tag in readme
    assert set(_crd_validators()) >= {
        (LWS_API, "LeaderWorkerSet"),
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("inference.networking.k8s.io/v1", "InferencePool"),
        ("llm-d.ai/v1alpha2", "InferenceObjective"),
    }


# --- every rendering passes the real tools ----------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict_is_clean(helm: Helm, scenario: str) -> None:
    files = [str(v if isinstance(v, Path) else helm.values_file(v)) for v in SCENARIOS[scenario]]
    result = helm.run("lint", "--strict", str(CHART), *[arg for f in files for arg in ("-f", f)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid(helm: Helm, scenario: str, kube_version: str) -> None:
    docs = helm.template(*SCENARIOS[scenario], kube_version=kube_version)
    expected = {
        "multinode-2x8": {"LeaderWorkerSet", "ServiceMonitor"},
        "keda": {"Deployment", "ScaledObject"},
        "inference-pool": {"Deployment", "InferencePool", "InferenceObjective"},
        "multinode-keda-pool": {"LeaderWorkerSet", "ScaledObject", "InferencePool", "InferenceObjective"},
    }[scenario]
    assert expected <= set(kinds(docs)), kinds(docs)
    for doc in docs:
        validate_any(doc, kube_version)


def test_the_crd_validation_rejects_broken_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The CRD checks can fail: a misspelt field, a wrong type, a bad enum value, a broken pod template."""
    import jsonschema

    docs = rendered["multinode-keda-pool"]
    lws = copy.deepcopy(one(docs, "LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["sizee"] = 2
    with pytest.raises(jsonschema.ValidationError, match="sizee"):
        validate_custom_resource(lws)
    lws = copy.deepcopy(one(docs, "LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        validate_custom_resource(lws)
    lws = copy.deepcopy(one(docs, "LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = (
        "lots"
    )
    with pytest.raises(Exception, match="lots"):
        validate_custom_resource(lws)
    scaled = copy.deepcopy(one(docs, "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one'"):
        validate_custom_resource(scaled)
    pool = copy.deepcopy(one(docs, "InferencePool"))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailSometimes"
    with pytest.raises(jsonschema.ValidationError, match="FailSometimes"):
        validate_custom_resource(pool)
    objective = copy.deepcopy(next(d for d in docs if d["kind"] == "InferenceObjective"))
    objective["spec"]["priority"] = "high"
    with pytest.raises(jsonschema.ValidationError, match="'high'"):
        validate_custom_resource(objective)


# --- multi-node -------------------------------------------------------------------------------------------


def _templates(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    template = one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return template["leaderTemplate"], template["workerTemplate"]


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_multinode_example_is_one_model_over_two_nodes_of_eight_gpus(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["multinode-2x8"]
    assert "Deployment" not in kinds(docs), "the LeaderWorkerSet replaces the Deployment"
    lws = one(docs, "LeaderWorkerSet")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["startupPolicy"] == "LeaderCreated", "the leader only turns Ready once workers joined"
    leader, worker = _templates(docs)
    [server] = leader["spec"]["containers"]
    [ray_worker] = worker["spec"]["containers"]
    for container in (server, ray_worker):
        for bound in ("requests", "limits"):
            assert container["resources"][bound]["nvidia.com/gpu"] == 8
        assert _mounts(container)["/models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
        assert _mounts(container)["/dev/shm"]["name"] == "shm"
    for template in (leader, worker):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "omniserve-models"
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"

    # the leader: the single pod's flags, plus Ray as vLLM's backend, served behind probes on /health
    params = parse_with_cli(server["args"])
    assert params["engine"] == "vllm" and str(params["model"]) == "/models/qwen2.5-omni-72b"
    engine_args = flag_values(server["args"], "--engine-arg")
    assert {"distributed_executor_backend=ray", "tensor_parallel_size=8", "pipeline_parallel_size=2"} <= set(
        engine_args
    )
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert server["command"][:2] == ["/bin/sh", "-c"] and "ray start --head" in server["command"][2]
    # the workers: Ray only, no HTTP, no probes that would wait for a server that is not there
    assert "ports" not in ray_worker and "readinessProbe" not in ray_worker
    assert "LWS_LEADER_ADDRESS" in ray_worker["command"][2] and "--block" in ray_worker["command"][2]
    assert "api-keys" not in {v["name"] for v in worker["spec"]["volumes"]}, "workers never see the keys"

    # only leaders serve: the Service selects worker index 0, and only leaders are scraped
    service = one(docs, "Service")
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert "prometheus.io/scrape" in leader["metadata"]["annotations"]
    assert "annotations" not in worker["metadata"]


def _fake_tools(tmp_path: Path) -> Path:
    """`ray` and `omniserve` stand-ins that log their arguments, one per line, to $CALLS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ray", "omniserve"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\n{{ echo "{tool}"; for a in "$@"; do echo "$a"; done; echo; }} >> "$CALLS"\n')
        script.chmod(0o755)
    return bin_dir


def _calls(path: Path) -> list[list[str]]:
    return [block.splitlines() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]


def test_leader_and_worker_scripts_run_as_written(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The scripts run under a real /bin/sh: the leader starts the Ray head, then hands omniserve exactly the
    argument list the chart rendered (flags with spaces or quotes included); a worker joins the leader's
    address, which LeaderWorkerSet gives it in LWS_LEADER_ADDRESS."""
    leader, worker = _templates(rendered["multinode-2x8"])
    [server] = leader["spec"]["containers"]
    [ray_worker] = worker["spec"]["containers"]
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{_fake_tools(tmp_path)}:/usr/bin:/bin",
        "CALLS": str(calls),
        "LWS_LEADER_ADDRESS": "big-0.big.llm",
    }
    tricky = ["--cors-origin", "https://a.example.com/it's here", "--log-level", "info"]
    run = subprocess.run([*server["command"], *server["args"], *tricky], env=env, timeout=30, check=False)
    assert run.returncode == 0
    head, deploy = _calls(calls)
    assert head[:3] == ["ray", "start", "--head"] and "--num-gpus=8" in head
    assert deploy == ["omniserve", "deploy", *server["args"], *tricky]
    calls.unlink()
    run = subprocess.run(ray_worker["command"], env=env, timeout=30, check=False)
    assert run.returncode == 0
    check, join = _calls(calls)
    assert check == ["ray", "health-check", "--address", "big-0.big.llm:6379"]
    assert join[:3] == ["ray", "start", "--address=big-0.big.llm:6379"]
    assert "--num-gpus=8" in join and join[-1] == "--block"
    for container in (server, ray_worker):
        assert subprocess.run(["/bin/sh", "-n", "-c", container["command"][2]], check=False).returncode == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"engine": {"name": "transformers", "args": {}}, "accelerator": {"count": 4}},
            "multiNode.enabled needs engine.name vllm",
        ),
        (
            {"engine": {"name": "sglang"}},
            "multiNode.enabled needs engine.name vllm",
        ),
        (
            {"engine": {"args": {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}}},
            "tensor_parallel_size x pipeline_parallel_size = 2 x 1 = 2 GPUs, but the group has "
            "multiNode.size x accelerator.count = 2 x 2 = 4",
        ),
        (
            {"multiNode": {"size": 3}},
            "= 2 x 2 = 4 GPUs, but the group has multiNode.size x accelerator.count = 3 x 2 = 6",
        ),
        (
            {"engine": {"args": {"distributed_executor_backend": "mp"}}},
            'distributed_executor_backend "mp" cannot reach the workers',
        ),
        ({"model": {"source": "builtin"}}, "multiNode.enabled needs model.source pvc, hostPath or download"),
        ({"quantization": {"method": "awq"}}, "multiNode.enabled with quantization.method"),
        (
            {"accelerator": {"count": 0}},
            "multiNode.enabled needs accelerator.count >= 1",
        ),
    ],
    ids=["transformers", "sglang", "too-few-gpus", "too-many-pods", "mp-backend", "builtin", "quant", "no-gpu"],
)
def test_multinode_refusals(helm: Helm, values: dict[str, Any], message: str) -> None:
    error = helm.template_error(merged(MULTI, values))
    assert message in error, error


def test_multinode_without_the_mode_keeps_the_single_pod_check(helm: Helm) -> None:
    """Outside multi-node mode the GPUs of the one pod must match, as before."""
    error = helm.template_error(merged(MULTI, {"multiNode": {"enabled": False}}))
    assert "tensor_parallel_size x pipeline_parallel_size = 4 GPUs, but accelerator.count = 2" in error


def test_schema_refuses_a_group_of_one(helm: Helm) -> None:
    error = helm.template_error(merged(MULTI, {"multiNode": {"size": 1}}))
    assert "multiNode.size" in error or "/multiNode/size" in error, error


# --- KEDA -------------------------------------------------------------------------------------------------


def _metric_names() -> set[str]:
    return set(re.findall(r'"(omniserve_[a-z_]+)"', METRICS_SOURCE.read_text(encoding="utf-8")))


def test_keda_scales_on_omniserve_queue_and_running_requests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["keda"]
    assert "HorizontalPodAutoscaler" not in kinds(docs), "KEDA creates its own HPA"
    assert "replicas" not in one(docs, "Deployment")["spec"], "KEDA owns the replica count"
    spec = one(docs, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rel-omniserve"}
    assert spec["minReplicaCount"] == 1, "scale-to-zero stays off unless asked for"
    queries = {t["name"]: t["metadata"]["query"] for t in spec["triggers"]}
    assert queries == {
        "queue-depth": 'sum(omniserve_queue_depth{namespace="llm",service="rel-omniserve"})',
        "running-requests": 'sum(omniserve_running_requests{namespace="llm",service="rel-omniserve"})',
    }
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["serverAddress"] == PROMETHEUS
        assert re.search(r"sum\((omniserve_[a-z_]+)\{", trigger["metadata"]["query"])[1] in _metric_names()
    assert [t["metadata"]["threshold"] for t in spec["triggers"]] == ["4", "32"]


def test_keda_values(helm: Helm) -> None:
    docs = helm.template(
        GPU_SINGLE,
        KEDA,
        {
            "keda": {
                "minReplicaCount": 0,
                "prometheus": {"labelMatchers": 'job="omniserve"', "authenticationRef": "prom-auth"},
                "queueDepth": {"threshold": 2.5, "activationThreshold": 1},
                "runningRequests": {"enabled": False},
            }
        },
    )
    spec = one(docs, "ScaledObject")["spec"]
    assert spec["minReplicaCount"] == 0
    [trigger] = spec["triggers"]
    assert trigger["metadata"] == {
        "serverAddress": PROMETHEUS,
        "query": 'sum(omniserve_queue_depth{job="omniserve"})',
        "threshold": "2.5",
        "activationThreshold": "1",
    }
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    validate_custom_resource(one(docs, "ScaledObject"))
    multi = helm.template(MULTINODE_EXAMPLE, KEDA)
    assert one(multi, "ScaledObject")["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    assert "replicas" not in one(multi, "LeaderWorkerSet")["spec"]


def test_keda_refusals(helm: Helm) -> None:
    error = helm.template_error(GPU_SINGLE, KEDA, {"autoscaling": {"enabled": True}})
    assert "autoscaling.enabled and keda.enabled both scale the same pods" in error
    error = helm.template_error(GPU_SINGLE, {"keda": {"enabled": True}})
    assert "keda.enabled needs keda.prometheus.serverAddress" in error
    error = helm.template_error(
        GPU_SINGLE, KEDA, {"keda": {"queueDepth": {"enabled": False}, "runningRequests": {"enabled": False}}}
    )
    assert "keda.enabled needs a trigger" in error
    assert "minReplicaCount" in helm.template_error(GPU_SINGLE, KEDA, {"keda": {"minReplicaCount": -1}})


def test_the_hpa_scales_groups_in_multinode_mode(helm: Helm) -> None:
    docs = helm.template(MULTINODE_EXAMPLE, {"autoscaling": {"enabled": True}})
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": LWS_API, "kind": "LeaderWorkerSet", "name": "rel-omniserve"}
    for doc in docs:
        validate_any(doc, KUBE_VERSIONS[-1])


# --- inference gateway ------------------------------------------------------------------------------------


def test_inference_pool_selects_the_serving_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario in ("inference-pool", "multinode-keda-pool"):
        docs = rendered[scenario]
        spec = one(docs, "InferencePool")["spec"]
        assert spec["selector"]["matchLabels"] == one(docs, "Service")["spec"]["selector"]
        assert spec["targetPorts"] == [{"number": 8000}]
        # the CRD's CEL rule (not checked by jsonschema): a Service reference needs its port
        assert spec["endpointPickerRef"] == {
            "name": "rel-omniserve-epp",
            "port": {"number": 9002},
            "failureMode": "FailClose",
        }
    multi = one(rendered["multinode-keda-pool"], "InferencePool")["spec"]["selector"]["matchLabels"]
    assert multi["leaderworkerset.sigs.k8s.io/worker-index"] == "0", "workers serve no HTTP"
    # the endpoint picker finds omniserve's metric names through the engine-type label of the serving pods
    single = one(rendered["inference-pool"], "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert single["llm-d.ai/engine-type"] == "omniserve"
    leader, worker = _templates(rendered["multinode-keda-pool"])
    assert leader["metadata"]["labels"]["llm-d.ai/engine-type"] == "omniserve"
    assert "llm-d.ai/engine-type" not in worker["metadata"]["labels"]
    assert "llm-d.ai/engine-type" not in one(rendered["keda"], "Deployment")["spec"]["template"]["metadata"]["labels"]
    objectives = {
        d["metadata"]["name"]: d["spec"] for d in rendered["inference-pool"] if d["kind"] == "InferenceObjective"
    }
    pool_ref = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "rel-omniserve"}
    assert objectives == {
        "interactive": {"poolRef": pool_ref, "priority": 10},
        "batch": {"poolRef": pool_ref, "priority": -10},
    }


def test_inference_pool_values(helm: Helm) -> None:
    docs = helm.template(
        GPU_SINGLE,
        {
            "server": {"port": 9000},
            "inferencePool": {
                "enabled": True,
                "name": "omni-pool",
                "endpointPicker": {"name": "my-epp", "port": 9100, "failureMode": "FailOpen"},
            },
        },
    )
    pool = one(docs, "InferencePool")
    assert pool["metadata"]["name"] == "omni-pool"
    assert pool["spec"]["targetPorts"] == [{"number": 9000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "my-epp", "port": {"number": 9100}, "failureMode": "FailOpen"}
    validate_custom_resource(pool)
    error = helm.template_error(GPU_SINGLE, {"inferencePool": {"enabled": True, "appProtocol": "grpc"}})
    assert "appProtocol" in error


def test_docs_map_endpoint_picker_metrics_to_real_omniserve_metrics() -> None:
    """The scaling-out docs tell the endpoint picker omniserve's metric names: each must exist."""
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    section = text.split("## Scaling out", 1)[1]
    for key in ("engineConfigs", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "llm-d.ai/engine-type"):
        assert key in section, key
    for flag in ("--total-queued-requests-metric", "--total-running-requests-metric", "--lora-info-metric"):
        assert flag in section
    named = set(re.findall(r"\b(omniserve_[a-z_]+)\b", section))
    assert {"omniserve_queue_depth", "omniserve_running_requests"} <= named
    assert named <= _metric_names(), named - _metric_names()


def test_example_values_file_carries_no_secrets() -> None:
    text = MULTINODE_EXAMPLE.read_text(encoding="utf-8")
    assert "apiKey" not in text and "--api-key " not in text
    assert os.path.basename(MULTINODE_EXAMPLE) in (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
