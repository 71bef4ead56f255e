"""Checkpoints that are complete or absent: written in a hidden staging folder, then renamed.

transformers' ``Trainer`` writes ``checkpoint-N`` in place, file after file; a kill (Ctrl-C,
SIGTERM, OOM) in the middle leaves a folder that looks like a checkpoint and is not one, and
``--resume`` would trust it. Here the whole checkpoint is staged in ``.staging-N/`` next to the
others and moved into place with one ``rename``, the atomic step of a POSIX file system. Leftover
staging folders from a killed run are deleted before training starts.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".staging-"
#: The file the trainer writes last; a checkpoint without it is not one.
STATE_FILE = "trainer_state.json"


def complete_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders under ``folder`` holding a trainer state, oldest step first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def last_checkpoint(folder: Path) -> Path | None:
    checkpoints = complete_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def remove_partial(folder: Path) -> list[Path]:
    """Delete the staging folders a killed run left behind; return what was removed."""
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def rotate(folder: Path, *, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints; each is renamed away first, so none is ever half there."""
    for old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
        doomed = folder / f"{STAGING_PREFIX}old-{old.name}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Move a fully written folder into place in one step (replacing an older copy of the same step)."""
    _fsync_tree(staged)
    if final.exists():
        shutil.rmtree(final)
    os.rename(staged, final)
    _fsync_dir(final.parent)


def _fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename makes them visible, so a power cut cannot publish empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
