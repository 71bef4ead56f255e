"""An existing Ray cluster for vLLM's workers (``--ray-address``): checked before the engine starts, then
handed to the process where vLLM connects to it.

vLLM connects to Ray itself, and not in the gateway's process: ``AsyncLLM`` runs its engine core in a
child process, whose Ray executor calls ``ray.init(address=None)`` (``initialize_ray_cluster`` in
``vllm/v1/executor/ray_utils.py``). Ray resolves that from ``RAY_ADDRESS``, else from the cluster
``ray start`` last began on that node. A ``ray.init`` in the gateway would not reach the child (and a
Ray connection does not survive the fork that makes it), so:

1. ``check_cluster`` connects to the address once, in a short-lived subprocess with a deadline. Left
   alone, Ray retries for minutes against an address where no cluster answers; here a missing Ray, an
   address where nothing listens and one where something else listens each fail at once (or at the
   deadline) with one message naming the fix. It reports the cluster's nodes and devices.
2. ``engine_environment`` sets ``RAY_ADDRESS`` to the address Ray resolved while vLLM creates its engine
   process, and restores it afterwards: the way vLLM hands the address to its own children
   (``_maybe_force_spawn`` in ``vllm/utils/system_utils.py``). Users set ``--ray-address``, not the variable.

Ray is the ``multinode`` extra; only this module's subprocess imports it, so the gateway's process never
holds a Ray connection of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from omniserve.errors import ModelLoadError

log = logging.getLogger(__name__)

RAY_BACKEND = "ray"
#: vLLM's engine arg choosing where its workers run.
BACKEND_ARG = "distributed_executor_backend"
#: How long a check may take to connect, Ray's own handshake included.
CONNECT_TIMEOUT_SECONDS = 30.0
INSTALL_HINT = "install the multinode extra (pip install 'omniserve[multinode]', Ray) beside vLLM on every node"
#: Connects as a Ray driver, prints what the gateway needs to know as one JSON line, disconnects.
_PROBE = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
alive = [node for node in ray.nodes() if node.get("Alive")]
print(json.dumps({"address": ray.get_runtime_context().gcs_address, "nodes": len(alive),
                  "resources": ray.cluster_resources()}))
ray.shutdown()
"""


@dataclass(frozen=True)
class RayCluster:
    """A cluster that answered: its head's address as Ray resolved it, its live nodes and resources."""

    address: str
    nodes: int
    resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        devices = ", ".join(f"{self.resources.get(kind, 0):g} {kind}" for kind in ("GPU", "CPU"))
        return f"Ray cluster at {self.address}: {self.nodes} node(s), {devices}"


def engine_args_for(ray_address: str | None, engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's engine args with the backend ``--ray-address`` implies; a contradicting backend is refused."""
    args = dict(engine_args)
    if ray_address is None:
        return args
    backend = args.setdefault(BACKEND_ARG, RAY_BACKEND)
    if backend != RAY_BACKEND:
        raise ModelLoadError(
            f"--ray-address runs vLLM's workers on a Ray cluster, but --engine-arg {BACKEND_ARG}={backend} "
            f"runs them elsewhere: leave that engine arg out (or set it to ray), or drop --ray-address"
        )
    return args


def check_cluster(address: str, *, world_size: int = 1, timeout: float = CONNECT_TIMEOUT_SECONDS) -> RayCluster:
    """Connect to the Ray cluster at ``address`` (``HOST:PORT`` or ``auto``) within ``timeout`` seconds.

    Raises ``ModelLoadError`` naming the address and the fix when Ray is missing or no cluster answers.
    A cluster with fewer GPUs than ``world_size`` is only a warning: vLLM waits for nodes to join (a
    group's workers may still be starting) until its placement group times out.
    """
    if importlib.util.find_spec("ray") is None:
        raise ModelLoadError(f"--ray-address {address}: Ray is not installed in this environment; {INSTALL_HINT}")
    if address != "auto":
        host, port = _host_port(address)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise ModelLoadError(
                f"--ray-address {address}: no Ray cluster answers there ({exc}). Fix: start the head with "
                f"`ray start --head --port={port}` on {host}, or give its address as `ray start` printed it"
            ) from exc
    cluster = _probe(address, timeout)
    if cluster.resources.get("GPU", 0) < world_size:
        log.warning(
            "%s; vLLM needs %d GPUs (tensor x pipeline parallel) and waits for more", cluster.describe(), world_size
        )
    else:
        log.info("%s", cluster.describe())
    return cluster


@contextlib.contextmanager
def engine_environment(cluster: RayCluster | None) -> Iterator[None]:
    """While vLLM creates its engine process: ``RAY_ADDRESS`` names ``cluster`` (nothing when None)."""
    if cluster is None:
        yield
        return
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ModelLoadError(
            f"--ray-address {address!r}: expected HOST:PORT of the Ray head (the address `ray start --address` "
            "takes, e.g. 10.0.0.5:6379) or auto"
        )
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float) -> RayCluster:
    """Run ``_PROBE`` in its own process group, so a connection Ray keeps retrying can be killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ModelLoadError(
            f"--ray-address {address}: something accepts connections there, but no Ray cluster answered within "
            f"{timeout:g} s. Fix: give the Ray head's GCS address (`ray start --head --port=PORT`; not its "
            "dashboard or client port), and check the firewall between this node and the head"
        ) from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = _last_error_line(err) or f"the check exited with status {proc.returncode}"
        raise ModelLoadError(
            f"--ray-address {address}: could not join the Ray cluster: {reason}. Fix: start one with "
            "`ray start --head`, and run the same Ray and Python versions on every node"
        )
    found = json.loads(lines[-1])
    return RayCluster(address=found["address"], nodes=int(found["nodes"]), resources=dict(found["resources"]))


def _last_error_line(stderr: str) -> str:
    """Ray's exception line (``ConnectionError: ...``), not its log noise."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (errors or lines or [""])[-1][:400]


def world_size(engine_args: Mapping[str, Any]) -> int:
    """Workers vLLM places on the cluster: tensor x pipeline parallel size (parsed engine args)."""
    return int(engine_args.get("tensor_parallel_size") or 1) * int(engine_args.get("pipeline_parallel_size") or 1)
