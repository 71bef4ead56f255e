"""An output folder that is complete or absent, and never a user's folder replaced without asking.

The checkpoint is written to a hidden sibling (``.<name>.<random>.partial``, same filesystem, so the
final rename is atomic), verified there, and renamed into place. ``--overwrite`` moves the old folder
aside first (``.<name>.<random>.old``) and deletes it only once the new one is in; if the rename fails
the old one comes back. The random parts come from ``mkdtemp`` and ``uuid4``, never from the process
id, which is 1 in every container: replicas sharing a volume must not pick the same name.

A run killed by a signal (SIGKILL, or SIGTERM, whose default action skips ``finally``) leaves these
siblings behind; ``sibling_owner`` recognises them so the quantization cache can sweep them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from omniserve.quantize.errors import InvalidQuantizeOption, NotEnoughDisk, OutputExists

#: ``.<output name>.<random>.partial`` (staging) or ``.<output name>.<random>.old`` (set aside).
_SIBLING = re.compile(r"^\.(?P<output>.+)\.[A-Za-z0-9_]+\.(?:partial|old)$")


def sibling_owner(name: str) -> str | None:
    """The output folder name a staging or set-aside sibling called ``name`` belongs to; None otherwise."""
    match = _SIBLING.match(name)
    return match.group("output") if match else None


def check_output(output: Path, model: Path, *, overwrite: bool) -> None:
    """Refuse an output that would overwrite a folder without --overwrite, or that overlaps the model."""
    out, src = output.resolve(), model.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise InvalidQuantizeOption(f"--output {output} must be outside the model folder {model} (and not contain it)")
    if is_populated(output) and not overwrite:
        raise OutputExists(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputExists(f"{output} exists and is not a folder")


def is_populated(folder: Path) -> bool:
    """An empty folder may be replaced by the rename; anything else is somebody's data."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


@contextlib.contextmanager
def disk_full_as_error(folder: Path) -> Iterator[None]:
    """A disk that fills up mid-write is the same NotEnoughDisk as one that was full up front."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NotEnoughDisk(f"the disk filled up while writing {folder}: {exc.strerror}") from exc
        raise


def make_readable(folder: Path) -> None:
    """mkdtemp makes an owner-only folder; a checkpoint is shared data like the one it came from."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644 if path.is_file() else 0o755)


def publish(staging: Path, output: Path, *, overwrite: bool) -> None:
    """Rename ``staging`` to ``output`` atomically; with ``overwrite`` the old folder goes only once the new is in."""
    if is_populated(output):
        if not overwrite:
            raise OutputExists(f"{output} appeared while quantizing; pass --overwrite to replace it")
        old = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(output, old)
        try:
            os.rename(staging, output)
        except OSError:
            os.rename(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(staging, output)  # replaces an empty folder; fails if another process just published
    except OSError as exc:
        if is_populated(output):
            raise OutputExists(f"{output} appeared while quantizing (another run?)") from exc
        raise
