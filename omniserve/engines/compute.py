"""Where the transformers engine computes: its dtype and its number of compute threads.

Two defaults decide most of a CPU server's speed, and neither of torch's own is right for serving:

- dtype. float32 is torch's default, but a CPU with native bfloat16 instructions (AVX-512 BF16, AMX)
  runs bfloat16 matmuls several times faster (measured on this project's 2-core AVX-512 BF16 machine:
  2x at one sequence, about 10x at 16 sequences on a 190M-parameter model). Without those
  instructions bfloat16 is emulated and slower than float32. ``auto`` picks by what the processor has.
- threads. torch sizes its intra-op pool by the machine's cores, not by what the process may use: in
  a container limited to 2 CPUs on a 64-core host that is 64 threads fighting over 2 cores. The
  default here is the cores the process can actually run on (its CPU affinity and its cgroup quota).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

#: CPU flags (Linux /proc/cpuinfo names) that mean bfloat16 matmuls run natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype the engine runs in, and why: logged at start so a slow server explains itself."""

    name: str  # a name models.loading.resolve_dtype accepts
    reason: str


def choose_dtype(requested: str, device: str, *, cpu_flags: frozenset[str] | None = None) -> DtypeChoice:
    """``requested`` unless it is ``auto``; then bfloat16 where ``device`` computes it natively, else float32."""
    if requested != "auto":
        return DtypeChoice(requested, "as asked (--dtype)")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "auto: the GPU supports bfloat16")
        return DtypeChoice("float16", "auto: the GPU has no bfloat16")
    if device != "cpu":
        return DtypeChoice("float32", f"auto: no native-bfloat16 check for device {device!r}")
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if native:
        return DtypeChoice("bfloat16", f"auto: the CPU computes bfloat16 natively ({', '.join(native)})")
    return DtypeChoice(
        "float32", "auto: the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16), float32 is faster"
    )


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The processor's feature flags, empty where the file is missing (not Linux) or unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (v2 or v1) if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of time the cgroup allows per period, or None when unlimited or unknown."""
    try:
        v2 = (root / "cpu.max").read_text().split()
        if len(v2) == 2 and v2[0] != "max":
            return int(v2[0]) / int(v2[1])
        if len(v2) == 2:
            return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def configure_threads(requested: int | None) -> int:
    """Set torch's intra-op pool to ``requested`` threads, or to the available cores; returns the number set."""
    import torch

    threads = requested or available_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
