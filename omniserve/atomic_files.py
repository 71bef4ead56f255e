"""Write a file so that readers see the old content or the new, never a half-written one.

Reports, gate scores and caches are read by later runs (``eval compare``, a cached gate, a resumed
job); a crash or a full disk in the middle of a plain ``write_text`` would leave a truncated JSON that
the next run misreads. Writing a sibling temporary file and renaming it over the target is atomic on
POSIX file systems, so the target is always whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    with _staged(Path(path)) as staging:
        staging.write_text(text, "utf-8")


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` write a temporary sibling of ``path`` (e.g. a plot's ``savefig``), then rename it."""
    with _staged(Path(path)) as staging:
        writer(staging)


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o644)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
