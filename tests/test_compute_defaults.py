"""The transformers engine's CPU defaults: bfloat16 only where the processor computes it natively, and
as many compute threads as the process may use (affinity and cgroup quota), not the host's cores."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from omniserve.config import EngineOptions
from omniserve.engines.compute import available_cores, choose_dtype, read_cpu_flags
from tests.conftest import wait_until


def test_auto_picks_bfloat16_only_with_native_bf16_instructions() -> None:
    assert choose_dtype("auto", "cpu", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"})).name == "bfloat16"
    assert choose_dtype("auto", "cpu", cpu_flags=frozenset({"amx_bf16", "amx_tile"})).name == "bfloat16"
    plain = choose_dtype("auto", "cpu", cpu_flags=frozenset({"avx2", "avx512f"}))
    assert plain.name == "float32" and "no native bfloat16" in plain.reason


def test_an_explicit_dtype_is_kept_whatever_the_cpu() -> None:
    choice = choose_dtype("float32", "cpu", cpu_flags=frozenset({"avx512_bf16"}))
    assert (choice.name, choice.reason) == ("float32", "as asked (--dtype)")


def test_dtype_option_defaults_to_auto_and_takes_short_names() -> None:
    assert EngineOptions().dtype == "auto"
    assert [EngineOptions(dtype=n).dtype for n in ("fp32", "float", "bf16", "fp16", "half")] == [
        "float32",
        "float32",
        "bfloat16",
        "float16",
        "float16",
    ]
    with pytest.raises(ValueError, match="'auto', 'float32', 'bfloat16' or 'float16'"):
        EngineOptions(dtype="int3")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\n")
    assert read_cpu_flags(info) == frozenset({"fpu", "sse2", "avx512_bf16"})
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def _cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


def test_threads_follow_the_cgroup_quota_not_the_host(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    no_cgroup = tmp_path / "none"
    no_cgroup.mkdir()
    assert available_cores(no_cgroup) == affinity
    limited = tmp_path / "v2"
    limited.mkdir()
    assert available_cores(_cgroup(limited, v2="50000 100000")) == 1  # half a CPU still gets one thread
    unlimited = tmp_path / "v2max"
    unlimited.mkdir()
    assert available_cores(_cgroup(unlimited, v2="max 100000")) == affinity
    v1 = tmp_path / "v1"
    v1.mkdir()
    assert available_cores(_cgroup(v1, v1=(100000, 100000))) == 1
    v1_unlimited = tmp_path / "v1u"
    v1_unlimited.mkdir()
    assert available_cores(_cgroup(v1_unlimited, v1=(-1, 100000))) == affinity


def test_the_engine_logs_its_dtype_and_threads(tiny_qwen2: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    import torch

    from omniserve.config import EngineConfig
    from omniserve.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(EngineConfig(model=tiny_qwen2, served_model_name="t", dtype="bf16", threads=1))
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="omniserve.engines.transformers_engine"):
        asyncio.run(engine.launch())
    try:
        assert "dtype bfloat16 (as asked (--dtype)), 1 compute threads" in caplog.text
        # the worker thread, where decoding runs, holds the setting (it is per thread in OpenMP)
        wait_until(lambda: engine.compute_threads == 1 and torch.get_num_threads() == before, timeout=10)
        assert engine._loaded.dtype == torch.bfloat16
    finally:
        engine.shutdown()
        torch.set_num_threads(before)
