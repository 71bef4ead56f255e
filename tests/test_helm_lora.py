"""The chart's LoRA values: adapters from a volume, rendered into `omniserve deploy`'s LoRA flags.

Checked as tests/test_helm.py checks the chart: `helm lint --strict`, every manifest against the
Kubernetes JSON schemas (kubernetes-validate, strict), values against values.schema.json by helm itself,
the chart's own refusals, and the rendered arguments read by the real `omniserve deploy` parser. Then
`--print-k8s` for a local command with adapters renders the same flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniserve.config import DeployOptions
from omniserve.flags import parse_argv
from omniserve.k8s_values import DEFAULT_ADAPTERS_CLAIM, dump_values_yaml, values_from_deploy
from tests.test_helm import (
    CHART,
    KUBE_VERSIONS,
    SCHEMA_ERROR,
    Helm,
    flag_values,
    mounts,
    parse_with_cli,
    pod_spec,
    server,
    start_helm,
    validate_manifest,
    volume,
)

ADAPTERS_DIR = "/adapters"
MODEL = {"source": "pvc", "pvc": {"claimName": "models"}, "path": "qwen"}
LORA = {
    "adapters": [{"name": "support", "path": "support-bot"}, {"name": "acme-sql", "path": "customers/acme/sql"}],
    "volume": {"claimName": "adapters"},
    "maxLoras": 4,
    "maxLoraRank": 32,
}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return start_helm(tmp_path_factory)


def values(**lora: Any) -> dict[str, Any]:
    return {"model": MODEL, "lora": {**LORA, **lora}}


def test_adapters_render_into_lora_flags_the_deploy_parser_accepts(helm: Helm) -> None:
    docs = helm.template(values())
    args = server(docs)["args"]
    assert flag_values(args, "--lora") == ["support=/adapters/support-bot", "acme-sql=/adapters/customers/acme/sql"]
    assert flag_values(args, "--max-loras") == ["4"] and flag_values(args, "--max-lora-rank") == ["32"]
    assert "--allow-runtime-lora" not in args and "--lora-root" not in args
    params = parse_with_cli(args)
    assert params["max_loras"] == 4 and params["max_lora_rank"] == 32
    assert params["lora"] == ["support=/adapters/support-bot", "acme-sql=/adapters/customers/acme/sql"]
    options = parse_argv(DeployOptions, args, what="deploy")
    assert options.server.lora == {
        "support": Path("/adapters/support-bot"),
        "acme-sql": Path("/adapters/customers/acme/sql"),
    }


def test_the_adapters_volume_is_mounted_read_only(helm: Helm) -> None:
    docs = helm.template(values())
    assert volume(docs, "lora-adapters")["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    mount = mounts(server(docs))[ADAPTERS_DIR]
    assert mount["name"] == "lora-adapters" and mount["readOnly"] is True
    for version in KUBE_VERSIONS:
        for doc in docs:
            validate_manifest(doc, version)


def test_any_volume_source_can_hold_the_adapters(helm: Helm) -> None:
    source = {"hostPath": {"path": "/data/adapters", "type": "Directory"}}
    docs = helm.template(values(volume={"source": source}))
    assert volume(docs, "lora-adapters") == {"name": "lora-adapters", **source}
    for doc in docs:
        validate_manifest(doc, KUBE_VERSIONS[-1])


def test_run_time_loading_reads_under_the_volume(helm: Helm) -> None:
    args = server(helm.template(values(allowRuntime=True)))["args"]
    assert "--allow-runtime-lora" in args and flag_values(args, "--lora-root") == [ADAPTERS_DIR]
    args = server(helm.template(values(adapters=[], allowRuntime=True, root="uploads/")))["args"]
    assert flag_values(args, "--lora-root") == ["/adapters/uploads"] and "--lora" not in args
    params = parse_with_cli(args)
    assert params["allow_runtime_lora"] is True and str(params["lora_root"]) == "/adapters/uploads"


def test_without_lora_values_nothing_changes(helm: Helm) -> None:
    docs = helm.template({"model": MODEL})
    args = server(docs)["args"]
    assert not any(arg.startswith(("--lora", "--max-lora", "--allow-runtime-lora")) for arg in args)
    assert ADAPTERS_DIR not in mounts(server(docs))
    assert "lora-adapters" not in [v["name"] for v in pod_spec(docs)["volumes"]]


def test_helm_lint_strict_is_clean_with_adapters(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART), "-f", str(helm.values_file(values(allowRuntime=True))))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


BAD_VALUES = {
    "path escaping the volume": ({"adapters": [{"name": "x", "path": "../models/x"}]}, "/lora/adapters/0/path"),
    "absolute path": ({"adapters": [{"name": "x", "path": "/etc/x"}]}, "/lora/adapters/0/path"),
    "adapter without a path": ({"adapters": [{"name": "x"}]}, "/lora/adapters/0"),
    "name with '='": ({"adapters": [{"name": "a=b", "path": "x"}]}, "/lora/adapters/0/name"),
    "name with a space": ({"adapters": [{"name": "my adapter", "path": "x"}]}, "/lora/adapters/0/name"),
    "zero resident adapters": ({"maxLoras": 0}, "/lora/maxLoras"),
    "rank as text": ({"maxLoraRank": "sixteen"}, "/lora/maxLoraRank"),
    "root escaping the volume": ({"allowRuntime": True, "root": "../x"}, "/lora/root"),
    "misspelt key": ({"maxLora": 2}, "'maxLora' not allowed"),
}


@pytest.mark.parametrize(("lora", "where"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_lora_values(helm: Helm, lora: dict[str, Any], where: str) -> None:
    error = helm.template_error(values(**lora))
    assert SCHEMA_ERROR in error and where in error, error


REFUSED = {
    "adapters without a volume": (values(volume={"claimName": ""}), "lora.volume.claimName"),
    "run-time loading without a volume": (
        {"model": MODEL, "lora": {"allowRuntime": True}},
        "lora.volume.claimName",
    ),
    "root without run-time loading": (values(root="uploads"), "it needs lora.allowRuntime"),
    "one name twice": (
        values(adapters=[{"name": "a", "path": "first"}, {"name": "a", "path": "second"}]),
        'the name "a" is used twice',
    ),
}


@pytest.mark.parametrize(("chart_values", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_the_chart_refuses_lora_values_that_cannot_work(helm: Helm, chart_values: dict[str, Any], message: str) -> None:
    error = helm.template_error(chart_values)
    assert message in error, error


def test_every_container_that_reads_the_flags_mounts_the_adapters(helm: Helm) -> None:
    """The quantize init step takes the server's flags (--lora included): it sees the same /adapters."""
    docs = helm.template({**values(), "quantization": {"method": "gptq", "mode": "initContainer"}})
    spec = pod_spec(docs)
    quantize = next(c for c in spec["initContainers"] if c["name"] == "quantize")
    assert "--lora" in quantize["args"] and ADAPTERS_DIR in mounts(quantize)
    assert ADAPTERS_DIR in mounts(server(docs))


# ---------------------------------------------------------------- --print-k8s


def test_print_k8s_carries_adapters_to_the_adapters_volume(helm: Helm, tmp_path: Path) -> None:
    root = tmp_path / "lora-root"
    (root / "team" / "support").mkdir(parents=True)
    (tmp_path / "elsewhere" / "sql").mkdir(parents=True)
    argv = [
        "--engine", "vllm",
        "--lora", f"support={root / 'team' / 'support'}",
        "--lora", f"sql={tmp_path / 'elsewhere' / 'sql'}",
        "--allow-runtime-lora", "--lora-root", str(root),
        "--max-loras", "3", "--max-lora-rank", "16",
        "--lora-admin-key", "sk-admin-secret",
    ]  # fmt: skip
    chart_values = values_from_deploy(parse_argv(DeployOptions, argv, what="deploy"))
    assert chart_values["lora"] == {
        "adapters": [{"name": "support", "path": "team/support"}, {"name": "sql", "path": "sql"}],
        "volume": {"claimName": DEFAULT_ADAPTERS_CLAIM, "source": {}},
        "maxLoras": 3,
        "maxLoraRank": 16,
        "allowRuntime": True,
        "root": "",
    }
    dumped = dump_values_yaml(chart_values)
    assert "sk-admin-secret" not in dumped and not any("lora" in arg for arg in chart_values["server"]["extraArgs"])
    assert f"# LoRA adapters must be on the PersistentVolumeClaim {DEFAULT_ADAPTERS_CLAIM!r}" in dumped  # the header
    path = tmp_path / "values.yaml"
    path.write_text(dumped, encoding="utf-8")
    docs = helm.template(path)
    args = server(docs)["args"]
    assert flag_values(args, "--lora") == ["support=/adapters/team/support", "sql=/adapters/sql"]
    assert flag_values(args, "--lora-root") == [ADAPTERS_DIR] and "--lora-admin-key" not in args
    for doc in docs:
        validate_manifest(doc, KUBE_VERSIONS[-1])


def test_print_k8s_without_adapters_mounts_nothing(helm: Helm) -> None:
    chart_values = values_from_deploy(parse_argv(DeployOptions, ["--engine", "transformers"], what="deploy"))
    assert chart_values["lora"]["adapters"] == [] and chart_values["lora"]["volume"]["claimName"] == ""
    docs = helm.template(helm.values_file(chart_values))
    assert ADAPTERS_DIR not in mounts(server(docs))


def test_a_multi_node_group_mounts_the_adapters_on_leader_and_workers(helm: Helm) -> None:
    """vLLM's workers on the other pods read the adapter files themselves: every pod needs the volume."""
    import yaml

    multinode = yaml.safe_load((CHART / "examples" / "multinode-2x8.yaml").read_text(encoding="utf-8"))
    docs = helm.template(multinode, {"lora": LORA})
    lws = next(doc for doc in docs if doc["kind"] == "LeaderWorkerSet")
    for role in ("leaderTemplate", "workerTemplate"):
        spec = lws["spec"]["leaderWorkerTemplate"][role]["spec"]
        assert "lora-adapters" in [v["name"] for v in spec["volumes"]], role
        assert all(ADAPTERS_DIR in mounts(c) for c in spec["containers"]), role
