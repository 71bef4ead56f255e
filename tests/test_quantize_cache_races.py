"""The quantization cache under kills and concurrency: real processes, real signals, real locks.

Replicas of a deployment share one cache volume (a Kubernetes PVC), and a pod is killed at any moment
(SIGTERM on a rollout, SIGKILL on OOM or after the grace period). These tests cause those events for
real on the tiny Qwen2 (FP8 quantizes it in seconds): a child process killed while its staging folder
is being written, two processes asking for the same entry at once, a checkpoint file replaced by one
of the same size and modification time, and a fingerprint memo written by many writers at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from omniserve.quantize.cache import ensure_quantized, entry_name, is_complete
from omniserve.quantize.checkpoint import content_fingerprint

T = TypeVar("T")

#: A child process that asks the cache for the tiny model's FP8 entry, logging what it does. With
#: "barrier" it first imports the heavy libraries (10-20 s here, and uneven under load), says "ready"
#: and waits for a line on stdin, so that several children ask at the same moment, as replicas
#: started together do, instead of whenever their imports happen to finish.
_CHILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(created).3f %(name)s: %(message)s")
from omniserve.quantize.cache import ensure_quantized
if sys.argv[3] == "barrier":
    import llmcompressor, torch, transformers
    print("ready", flush=True)
    sys.stdin.readline()
print(ensure_quantized(Path(sys.argv[1]), "fp8", cache_dir=Path(sys.argv[2]), progress=False), flush=True)
"""


def _start_child(
    model: Path, cache_dir: Path, *, barrier: bool = False, log: Path | None = None
) -> subprocess.Popen[str]:
    """The child, its output piped (read it with ``communicate``) or, with ``log``, written to that file.

    A child that nobody reads while it runs must write to a file: a full pipe would block it.
    """
    sink = log.open("w") if log is not None else subprocess.PIPE
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(model), str(cache_dir), "barrier" if barrier else "go"],
            stdin=subprocess.PIPE if barrier else subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
            text=True,
        )
    finally:
        if log is not None:
            sink.close()


def _poll(find: Callable[[], T | None], child: subprocess.Popen[str], *, timeout: float) -> T:
    """What ``find`` returns once it returns something, polling fast; fails if the child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found is not None:
            return found
        if child.poll() is not None:
            pytest.fail(f"the child exited ({child.returncode}) before the awaited moment")
        time.sleep(0.002)
    child.kill()
    pytest.fail(f"nothing found within {timeout} s")


def _staging_being_written(cache_dir: Path) -> Path | None:
    """A staging folder in which the save has written at least one file (so the kill lands mid-save)."""
    try:
        staging = [p for p in cache_dir.iterdir() if p.name.endswith(".partial") and p.is_dir()]
        return next((p for p in staging if any(p.iterdir())), None)
    except FileNotFoundError:  # the cache folder not made yet, or the staging folder just renamed away
        return None


def _hidden(cache_dir: Path) -> list[str]:
    """Leftovers: every hidden name in the cache folder except the memo and its lock."""
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith(".") and p.name not in _MEMO_FILES)


_MEMO_FILES = {".fingerprints.json", ".fingerprints.json.lock"}


# ------------------------------------------------------------------------------ (1) a kill mid-save


def test_a_run_killed_while_saving_is_swept_and_redone(
    tiny_qwen2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL mid-save (SIGTERM ends a Python process the same way: its default action skips ``finally``)."""
    cache = tmp_path / "cache"
    log = tmp_path / "child.log"
    child = _start_child(tiny_qwen2, cache, log=log)
    staging = _poll(lambda: _staging_being_written(cache), child, timeout=180)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    entry = cache / entry_name(tiny_qwen2, "fp8", cache_dir=cache)
    assert staging.is_dir(), "the kill came too late: the staging folder was already gone"
    assert not is_complete(entry), "the kill came too late: the entry was already published"
    left = {p.name: p.stat().st_size for p in staging.iterdir()}

    with caplog.at_level("INFO", logger="omniserve.quantize"):
        started = time.perf_counter()
        result = ensure_quantized(tiny_qwen2, "fp8", cache_dir=cache, progress=False)
        seconds = time.perf_counter() - started
    assert result == entry
    assert is_complete(entry)
    assert not staging.exists()
    assert _hidden(cache) == []  # no staging, no .old folder, no temporary memo file
    assert f"removed {staging.name}" in caplog.text
    assert caplog.text.count("quantization cache miss") == 1
    print(f"SIGKILL left {staging.name} holding {left}; the next run swept it and quantized in {seconds:.1f} s")


# ------------------------------------------------------------------------------ (2) two at once


def test_two_processes_asking_for_one_entry_quantize_once(tiny_qwen2: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    children = [_start_child(tiny_qwen2, cache, barrier=True) for _ in range(2)]
    for child in children:
        assert child.stdout is not None
        while (line := child.stdout.readline()) and line.strip() != "ready":  # libraries print too
            pass
        assert line, f"child {child.pid} exited before its barrier"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
    logs = [err for _, err in outputs]
    entry = cache / entry_name(tiny_qwen2, "fp8", cache_dir=cache)
    assert [Path(out.strip().splitlines()[-1]) for out, _ in outputs] == [entry, entry]  # libraries print too
    assert sum(log.count("quantization cache miss") for log in logs) == 1
    quantizer = next(i for i, log in enumerate(logs) if "quantization cache miss" in log)
    waiter = logs[1 - quantizer]
    # the waiter names the holder (host and pid) and then gets a hit without quantizing
    assert re.search(rf"is being written by \S+ pid {children[quantizer].pid}\b", waiter), waiter
    assert "quantization cache hit" in waiter
    waited = re.search(r"waited ([0-9.]+) s", waiter)
    assert waited is not None, waiter
    assert is_complete(entry)
    assert _hidden(cache) == []
    print(f"the second process waited {waited.group(1)} s, then hit")


def test_a_waiter_whose_holder_dies_sweeps_its_leftover_and_quantizes(
    tiny_qwen2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The holder dies mid-save while another process waits: the waiter removes the leftover, then quantizes.

    The dying holder is this test: it holds the entry's lock and leaves a staging folder, then lets the
    lock go, which is what the kernel does for a killed process (the kill itself is test (1)).
    """
    from omniserve.atomic_files import exclusive_lock
    from omniserve.quantize.cache import entry_lock

    cache = tmp_path / "cache"
    entry = cache / entry_name(tiny_qwen2, "fp8", cache_dir=cache)
    leftover = cache / f".{entry.name}.dead0001.partial"
    results: list[Path | BaseException] = []

    def waiter() -> None:
        try:
            results.append(ensure_quantized(tiny_qwen2, "fp8", cache_dir=cache, progress=False))
        except BaseException as exc:  # reported below
            results.append(exc)

    with caplog.at_level("INFO", logger="omniserve.quantize"), exclusive_lock(entry_lock(entry)):
        leftover.mkdir()
        (leftover / "config.json").write_text('{"half')
        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 60
        while "waiting for that run to finish" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftover.is_dir()  # the start-up sweep left it: its entry was locked
        assert f"left {leftover.name} alone" in caplog.text
    with caplog.at_level("INFO", logger="omniserve.quantize"):
        thread.join(timeout=300)
    assert results == [entry]
    assert is_complete(entry)
    assert not leftover.exists()
    assert f"removed {leftover.name}" in caplog.text
    assert re.search(rf"is being written by \S+ pid {os.getpid()}\b", caplog.text)
    assert caplog.text.count("quantization cache miss") == 1


# ------------------------------------------------------------------------------ sweeping


def test_sweep_removes_leftovers_only_when_their_entry_lock_is_free(tmp_path: Path) -> None:
    from omniserve.atomic_files import exclusive_lock
    from omniserve.quantize.cache import sweep_stale

    cache = tmp_path / "cache"
    cache.mkdir()
    busy, dead = "m-fp8-0123456789abcdef", "m-gptq-fedcba9876543210"
    busy_staging = cache / f".{busy}.a1b2c3d4.partial"
    dead_staging = cache / f".{dead}.zz9_yy8x.partial"
    dead_old = cache / f".{dead}.0f0f0f0f.old"
    memo_tmp = cache / ".fingerprints.json.k3j2h1g0.partial.json"
    legacy_memo_tmp = cache / ".fingerprints.json.1.tmp"  # what older versions left (named by the pid)
    for folder in (busy_staging, dead_staging, dead_old):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    memo_tmp.write_text('{"torn')
    legacy_memo_tmp.write_text('{"torn')
    complete = cache / busy
    complete.mkdir()  # a published entry and its lock are never swept
    (complete / "config.json").write_text("{}")

    with exclusive_lock(cache / f"{busy}.lock"):  # another open file description: another writer
        removed = sweep_stale(cache)
    assert sorted(p.name for p in removed) == sorted(
        p.name for p in (dead_staging, dead_old, memo_tmp, legacy_memo_tmp)
    )
    assert busy_staging.is_dir()  # its entry is locked: somebody is writing it right now
    assert complete.is_dir()
    assert [p.name for p in sweep_stale(cache)] == [busy_staging.name]  # free now: a leftover
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [busy, f"{busy}.lock", f"{dead}.lock", ".fingerprints.json.lock"]
    )


def test_lock_names_its_holder_and_a_waiter_sees_it(tmp_path: Path) -> None:
    import socket

    from omniserve.atomic_files import exclusive_lock, lock_holder

    lock = tmp_path / "entry.lock"
    seen: list[str] = []
    with exclusive_lock(lock):
        assert lock_holder(lock).startswith(f"{socket.gethostname()} pid {os.getpid()} since ")
        waiter = threading.Thread(target=lambda: _take(lock, seen))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # blocked by us
    waiter.join(timeout=10)
    assert seen and seen[0].startswith(f"{socket.gethostname()} pid {os.getpid()}")


def _take(lock: Path, seen: list[str]) -> None:
    from omniserve.atomic_files import exclusive_lock

    with exclusive_lock(lock, on_wait=seen.append):
        pass


# ------------------------------------------------------------------------------ (3) fingerprints


def _weights_folder(root: Path, content: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["X"]}')
    (root / "model.safetensors").write_bytes(content)
    return root


def _settle() -> None:
    """Wait until files written now are past the memo's "in doubt" window, so the memo is trusted."""
    from omniserve.quantize.checkpoint import MEMO_SETTLE_SECONDS

    time.sleep(MEMO_SETTLE_SECONDS + 0.2)


@pytest.mark.parametrize("how", ["renamed over", "rewritten in place"])
def test_a_same_size_same_mtime_replacement_changes_the_fingerprint(how: str, tmp_path: Path) -> None:
    memo = tmp_path / "cache" / ".fingerprints.json"
    model = _weights_folder(tmp_path / "model", b"A" * 4096)
    weights = model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    other = _weights_folder(tmp_path / "other", b"B" * 4096)  # same size, other bytes
    expected_b = content_fingerprint(other)
    _settle()
    before = content_fingerprint(model, memo)
    assert json.loads(memo.read_text())  # A's digest is remembered

    if how == "renamed over":  # rsync -t, cp to a temporary name and mv: a new inode
        replacement = model / ".incoming"
        replacement.write_bytes(b"B" * 4096)
        os.utime(replacement, ns=(mtime, mtime))
        os.replace(replacement, weights)
    else:  # cp -p over the old file: same inode, mtime set back
        with weights.open("r+b") as fh:
            fh.write(b"B" * 4096)
        os.utime(weights, ns=(mtime, mtime))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (4096, mtime)

    after = content_fingerprint(model, memo)
    assert after != before
    assert after == expected_b


def test_a_rewrite_right_after_hashing_is_rehashed(tmp_path: Path) -> None:
    """Within the file system's timestamp granularity even ctime may not move: such files are hashed again."""
    memo = tmp_path / ".fingerprints.json"
    model = _weights_folder(tmp_path / "model", b"A" * 4096)
    weights = model / "model.safetensors"
    stat = weights.stat()
    before = content_fingerprint(model, memo)
    with weights.open("r+b") as fh:
        fh.write(b"B" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_fingerprint(model, memo) != before


def test_a_torn_memo_is_treated_as_empty(tmp_path: Path) -> None:
    memo = tmp_path / ".fingerprints.json"
    model = _weights_folder(tmp_path / "model", b"A" * 4096)
    expected = content_fingerprint(model)
    _settle()
    for torn in (b'{"/x|1|2": "ab', b"[1, 2]", b'{"k": 5}', b'{"/x": {"stat": "no"}}', b"\x00\xff\xfe", b""):
        memo.write_bytes(torn)
        assert content_fingerprint(model, memo) == expected, torn
        remembered = json.loads(memo.read_text())  # rewritten whole, the garbage dropped
        assert sorted(Path(name).name for name in remembered) == ["config.json", "model.safetensors"], torn
        assert content_fingerprint(model, memo) == expected, torn


def test_concurrent_memo_writers_never_tear_it(tmp_path: Path) -> None:
    """Threads share one pid, as containers' pid-1 processes do: a pid-named temporary file collides."""
    memo = tmp_path / "cache" / ".fingerprints.json"
    folders = [_weights_folder(tmp_path / f"m{i}", bytes([i]) * 1024) for i in range(48)]
    _settle()
    errors: list[BaseException] = []

    def worker(mine: list[Path]) -> None:
        try:
            for folder in mine:
                content_fingerprint(folder, memo)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(folders[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    remembered = json.loads(memo.read_text())
    assert len(remembered) == 2 * len(folders)  # every writer's digests kept (merged under the memo's lock)
    assert _hidden(memo.parent) == []
