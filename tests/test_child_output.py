"""An engine child's own error reaches the start-up failure message, and its output still reaches the user."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omniserve.engines.child_output import ChildOutputTail

CHILD = (
    "import sys; "
    "print('(EngineCore pid=7) INFO 11-28 08:51:50 [core.py:90] loading', file=sys.stderr); "
    "print('(EngineCore pid=7) ERROR 11-28 08:51:57 [core.py:1510] ValueError: No available memory for the cache "
    "blocks.', file=sys.stderr); "
    "print('(EngineCore pid=7) ERROR 11-28 08:51:58 [core.py:1511] done', file=sys.stderr); sys.exit(1)"
)


def test_a_dead_childs_error_is_kept_and_forwarded(capfd: pytest.CaptureFixture[str]) -> None:
    tail = ChildOutputTail()
    with tail:
        code = subprocess.call([sys.executable, "-c", CHILD])  # inherits fd 2, as vLLM's engine core does
        print("parent line", file=sys.stderr)
    assert code == 1
    tail.settle()
    assert tail.root_cause() == "ValueError: No available memory for the cache blocks."
    print("after", file=sys.stderr)  # this process writes to the real stderr again
    err = capfd.readouterr().err
    assert "[core.py:90] loading" in err and "parent line" in err and err.rstrip().endswith("after")


def test_no_error_line_means_no_cause() -> None:
    tail = ChildOutputTail()
    with tail:
        subprocess.call([sys.executable, "-c", "import sys; print('all fine', file=sys.stderr)"])
    tail.settle()
    assert tail.root_cause() is None


def test_an_error_logged_to_stdout_is_found_too(capfd: pytest.CaptureFixture[str]) -> None:
    """LMDeploy logs its environment checks to stdout, then exits."""
    line = (
        "2026-11-28 09:02:56,115 - lmdeploy - ERROR - base.py:54 - RuntimeError: Found no NVIDIA driver on your system."
    )
    tail = ChildOutputTail()
    with tail:
        subprocess.call([sys.executable, "-c", f"print({line!r})"])
    tail.settle()
    assert tail.root_cause() == "RuntimeError: Found no NVIDIA driver on your system."
    assert line in capfd.readouterr().out


def test_a_process_started_with_stdout_closed_can_still_start_an_engine() -> None:
    """Daemons are sometimes started with a stream closed: the capture then skips it instead of failing."""
    import os

    code = (
        "import sys\n"
        "from omniserve.engines.child_output import ChildOutputTail\n"
        "tail = ChildOutputTail()\n"
        "with tail:\n"
        "    print('ValueError: seen on stderr', file=sys.stderr, flush=True)\n"
        "tail.settle()\n"
        "assert tail.root_cause() == 'ValueError: seen on stderr', tail.root_cause()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1)
    )
    assert result.returncode == 0, result.stderr.decode()
