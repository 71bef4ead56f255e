"""Files shared between runs and processes: whole-or-nothing writes, and exclusive locks.

Reports, gate scores and caches are read by later runs (``eval compare``, a cached gate, a resumed
job); a crash or a full disk in the middle of a plain ``write_text`` would leave a truncated JSON that
the next run misreads. Writing a sibling temporary file and renaming it over the target is atomic on
POSIX file systems, so the target is always whole. The temporary name comes from ``mkstemp`` (random,
created exclusively), never from the process id: every container's first process is pid 1, so two
replicas sharing a volume would otherwise write the same temporary file.

Some work must also be done by one process at a time (two replicas filling the same cache entry).
``exclusive_lock`` holds a ``flock`` on a lock file: the kernel drops it when its holder dies, even by
SIGKILL, so a lock is never left stale and nothing has to guess from timestamps. While held, the file
names its holder (host, pid, since when) for whoever waits. Lock files are never deleted: removing
one while a process has it open would let a third process lock a new file of the same name.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: What ``lock_holder`` says of a lock file nobody has signed (yet).
UNNAMED_HOLDER = "a process that has not named itself yet"
#: How long a waiter gives a new holder to sign its lock file before saying it does not know whom it waits for.
SIGN_PATIENCE_SECONDS = 1.0


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


@contextlib.contextmanager
def exclusive_lock(path: Path, *, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if absent), waiting as long as its holder keeps it.

    ``on_wait`` is called with the holder's description (``lock_holder``) before waiting, so the
    caller can say whom it waits for; it is not called when the lock is free.
    """
    fd = _open_lock(Path(path))
    try:
        if not _try_lock(fd):
            holder = _signed_holder(Path(path), fd) if on_wait is not None else ""
            if holder is not None:  # still held: say whom we wait for, then wait
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        _sign(fd)
        yield
    finally:
        _release(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _signed_holder(path: Path, fd: int, patience: float = SIGN_PATIENCE_SECONDS) -> str | None:
    """The holder's name, or None once the lock was taken here after all.

    A holder writes its name just after it takes the lock; a waiter that looks in between would read an
    empty file, so it looks again for a moment (and takes the lock if it is released meanwhile).
    """
    deadline = time.monotonic() + patience
    while True:
        holder = lock_holder(path)
        if holder != UNNAMED_HOLDER or time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)
        if _try_lock(fd):
            return None


@contextlib.contextmanager
def try_exclusive_lock(path: Path) -> Iterator[bool]:
    """Take the lock on ``path`` if nobody holds it: yields True (held until the block ends) or False.

    False also when the lock file cannot be opened (a read-only volume): whoever cannot lock must
    assume somebody else holds it.
    """
    try:
        fd = _open_lock(Path(path))
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held elsewhere (BlockingIOError), or not lockable through this descriptor
        os.close(fd)
        yield False
        return
    try:
        _sign(fd)
        yield True
    finally:
        _release(fd)


def lock_holder(path: Path) -> str:
    """Who holds (or last held, if it was killed) the lock on ``path``: "host pid N since TIME"."""
    try:
        text = Path(path).read_text("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or UNNAMED_HOLDER


def _open_lock(path: Path) -> int:
    """Read-write to record the holder; read-only (flock works on it too) where writing is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM) or not path.exists():
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _sign(fd: int) -> None:
    """Write who holds the lock into its file; best effort (a read-only descriptor stays silent)."""
    since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {since}\n".encode(), 0)


def _release(fd: int) -> None:
    """Clear the holder's name, unlock, close.

    Unlocking explicitly, not by closing: a child forked meanwhile (a data-loader worker) shares the
    descriptor, and the lock would last as long as that child. Exec'd children never get it (O_CLOEXEC).
    """
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
