"""Keep the tail of what an engine (and its child processes) print while it starts.

vLLM and SGLang build their workers in child processes. When a child fails during start-up (not
enough memory for the KV cache, a model it cannot build), the parent only gets "initialization
failed, see above": the cause itself was logged by the child to the stdout/stderr it inherited.
LMDeploy logs its environment checks (to stdout) and then calls ``exit(1)``. While an engine starts,
file descriptors 1 and 2 are routed through pipes that forward everything unchanged and remember the
last lines, so the start-up failure message can quote the engine's own error. Children keep the
pipes after start-up; each forwarding thread ends when the last writer closes its pipe.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
from types import TracebackType

#: ``SomeError: message`` anywhere in a line, after whatever prefix the engine's logger writes, e.g.
#: ``(EngineCore pid=12) ERROR 11-28 08:51:57 [core.py:1510] ValueError: ...`` (vLLM) or
#: ``2026-11-28 09:02:56,115 - lmdeploy - ERROR - base.py:54 - RuntimeError: ...`` (LMDeploy).
_EXCEPTION = re.compile(r"\b([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
_STREAMS = (1, 2)


class ChildOutputTail:
    """A context manager: inside it, fds 1 and 2 go through pipes whose last ``keep`` lines are kept."""

    def __init__(self, keep: int = 200) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ChildOutputTail:
        _flush()
        for fd in _STREAMS:
            try:
                saved = os.dup(fd)
            except OSError:  # started with that stream closed: nothing to forward, nothing to keep
                continue
            read_end, write_end = os.pipe()
            self._saved[fd] = saved
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(target=self._forward, args=(read_end, self._saved[fd]), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # this process writes to the real streams again; the children keep the pipes

    def _forward(self, read_end: int, real: int) -> None:
        pending = b""
        try:
            while chunk := os.read(read_end, 65536):
                os.write(real, chunk)
                pending += chunk
                *complete, pending = pending.split(b"\n")
                self._lines.extend(line.decode("utf-8", "replace") for line in complete)
        finally:
            os.close(read_end)
            os.close(real)

    def settle(self, timeout: float = 2.0) -> None:
        """Give the forwarding threads time to read what dead children wrote last.

        They may never see the end of their pipe (a long-lived helper process, e.g. multiprocessing's
        resource tracker, inherits it too), so this waits at most ``timeout`` seconds in all.
        """
        for thread in self._threads:
            thread.join(timeout / len(self._threads))

    def root_cause(self) -> str | None:
        """The last ``SomeError: message`` written so far (log prefixes removed), if any.

        The parent's own "initialization failed, see above" lines are passed over: they are not a cause.
        """
        for line in reversed(list(self._lines)):
            match = _EXCEPTION.search(line.strip())
            if match and "initialization failed" not in match.group(0).lower():
                return match.group(0)
        return None


def _flush() -> None:
    """Python's buffered output goes out before the descriptors under it change."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
