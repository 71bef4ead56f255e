"""Keep the tail of what an engine's child processes write to stderr while it starts.

vLLM runs its scheduler and model in a child process (the engine core). When that child fails during
start-up (not enough memory for the KV cache, a model it cannot build), the parent only gets
"Engine core initialization failed. See root cause above"; the cause itself was logged by the child
to the stderr it inherited. While the engine starts, file descriptor 2 is routed through a pipe that
forwards everything unchanged to the real stderr and remembers the last lines, so the start-up
failure message can quote the child's own error. Children keep the pipe after start-up; the
forwarding thread ends when the last of them closes it.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
from types import TracebackType

#: ``(EngineCore pid=12) ERROR 11-28 08:51:57 [core.py:1510] ValueError: ...`` -> ``ValueError: ...``
_LOG_PREFIX = re.compile(r"^(\(\S+ pid=\d+\)\s+)?(ERROR|CRITICAL)?\s*(\d\d-\d\d \d\d:\d\d:\d\d\s+)?(\[\S+\]\s+)?")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception)): (.+)$")


class ChildStderrTail:
    """A context manager: inside it, fd 2 goes through a pipe whose last ``keep`` lines are kept."""

    def __init__(self, keep: int = 200) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ChildStderrTail:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        self._saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._forward, args=(read_end, self._saved), daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sys.stderr.flush()
        if self._saved is not None:
            os.dup2(self._saved, 2)  # this process is back on the real stderr; the children keep the pipe

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
        """Give the forwarding thread time to read what dead children wrote last.

        It may never see the end of the pipe (a long-lived helper process, e.g. multiprocessing's
        resource tracker, inherits it too), so this waits at most ``timeout`` seconds.
        """
        if self._thread is not None:
            self._thread.join(timeout)

    def root_cause(self) -> str | None:
        """The last ``SomeError: message`` line written so far (log prefixes removed), if any."""
        for line in reversed(list(self._lines)):
            text = _LOG_PREFIX.sub("", line.strip(), count=1)
            match = _EXCEPTION_LINE.match(text)
            if match and "Engine core initialization failed" not in text:
                return text
        return None
