"""Facts about a checkpoint folder read from disk: is it one, is it quantized, how big, what content.

Everything here reads files only (no torch), so the CLI can refuse a bad folder, an already
quantized one or a full disk in milliseconds, before minutes of imports and loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.atomic_files import exclusive_lock, write_text_atomic
from omniserve.quantize.errors import AlreadyQuantized, NotACheckpoint, NotEnoughDisk

log = logging.getLogger("omniserve.quantize")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Files read by the weight loader; everything else in a checkpoint folder is copied beside the output.
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Free space kept in reserve beyond the estimate (config, tokenizer, report, filesystem slack).
_DISK_MARGIN_BYTES = 64 * 1024 * 1024
#: A file changed less than this long before it was hashed is hashed again next time, not remembered
#: (coarse timestamps: FAT and some NFS servers keep 1-2 s, ext4 and XFS one clock tick).
MEMO_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def quant_method(self) -> str | None:
        return quant_method(self.config)


def quant_method(config: dict[str, Any]) -> str | None:
    """The ``quantization_config.quant_method`` of a config.json (top level or in a text sub-config)."""
    for section in (config, config.get("text_config") or {}, config.get("thinker_config") or {}):
        qc = section.get("quantization_config") if isinstance(section, dict) else None
        if isinstance(qc, dict):
            return str(qc.get("quant_method") or "unknown")
    return None


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read ``path``'s config.json and list its weight files; refuse anything that is not a checkpoint."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise NotACheckpoint(f"{path} is not a folder")
    if not config_file.is_file():
        raise NotACheckpoint(f"{path} is not a checkpoint folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise NotACheckpoint(f"{config_file} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict) or not config.get("architectures"):
        raise NotACheckpoint(f"{config_file} names no 'architectures': not a transformers checkpoint")
    weights = tuple(sorted(f for f in path.iterdir() if f.is_file() and is_weight_file(f)))
    if not any(f.suffix in (".safetensors", ".bin") for f in weights):
        raise NotACheckpoint(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    return CheckpointInfo(path=path, config=config, weight_files=weights)


def is_weight_file(path: Path) -> bool:
    """Weights and their index: what a quantized output replaces rather than copies."""
    return path.name in _WEIGHT_INDEXES or (path.suffix in _WEIGHT_SUFFIXES and path.name != "spk_dict.pt")


def refuse_quantized(info: CheckpointInfo) -> None:
    method = info.quant_method
    if method is not None:
        raise AlreadyQuantized(info.path, method)


def folder_bytes(path: Path, *, weights_only: bool = True) -> int:
    """Bytes on disk of a folder's weight files (or of all its files)."""
    return sum(
        f.stat().st_size for f in Path(path).iterdir() if f.is_file() and (not weights_only or is_weight_file(f))
    )


def check_free_space(target_dir: Path, needed_bytes: int) -> None:
    """Refuse up front when ``target_dir``'s filesystem cannot hold ``needed_bytes`` plus a margin."""
    probe = Path(target_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = needed_bytes + _DISK_MARGIN_BYTES
    if free < needed:
        raise NotEnoughDisk(
            f"not enough disk space in {probe}: the quantized checkpoint needs up to {_mib(needed)} "
            f"(at most the original weights' size plus {_mib(_DISK_MARGIN_BYTES)} of margin), {_mib(free)} is free"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def content_fingerprint(path: Path, memo_file: Path | None = None) -> str:
    """SHA-256 over every file's name and bytes: same content, same key, wherever the folder lives.

    Hashing a 15 GB checkpoint takes tens of seconds, so per-file digests are remembered in
    ``memo_file`` (see ``_file_identity`` for when a remembered digest is trusted). The memo is only a
    shortcut: unreadable, torn or unwritable, it is ignored and the files are hashed.
    """
    memo = _read_memo(memo_file) if memo_file is not None else {}
    outer = hashlib.sha256()
    learned: dict[str, dict[str, Any]] = {}
    for file in sorted(f for f in Path(path).rglob("*") if f.is_file()):
        stat = file.stat()
        name, identity = str(file.resolve()), _file_identity(stat)
        remembered = memo.get(name)
        if remembered is not None and remembered["stat"] == identity:
            digest = remembered["sha256"]
        else:
            started_ns = time.time_ns()
            digest = _file_sha256(file)
            # "in doubt" means: written so recently that a rewrite in the same timestamp tick would
            # leave size, mtime and even ctime as they are, or changed while it was being read
            settled = started_ns - max(stat.st_mtime_ns, stat.st_ctime_ns) >= MEMO_SETTLE_SECONDS * 1e9
            if settled and _file_identity(file.stat()) == identity:
                learned[name] = {"stat": identity, "sha256": digest}
        outer.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
    if memo_file is not None and learned:
        _remember(memo_file, learned)
    return outer.hexdigest()


def _file_identity(stat: os.stat_result) -> list[int]:
    """What must be unchanged for a remembered digest to hold: device, inode, size, mtime and ctime.

    Size and mtime alone are not enough: ``cp -p``, ``rsync -t`` or ``os.utime`` give a different file
    the same size and mtime. A replacement by rename brings a new inode; a rewrite in place moves the
    ctime, which no user call can set back. Files younger than ``MEMO_SETTLE_SECONDS`` are not
    remembered at all, because within one timestamp tick even the ctime may not move.
    """
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read_memo(memo_file: Path) -> dict[str, dict[str, Any]]:
    """The memo's well-formed entries; a missing, torn or foreign file reads as empty."""
    try:
        data = json.loads(memo_file.read_bytes())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        name: entry
        for name, entry in data.items()
        if isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("stat"), list)
        and len(entry["stat"]) == 5
        and all(isinstance(n, int) for n in entry["stat"])
    }


def _remember(memo_file: Path, learned: dict[str, dict[str, Any]]) -> None:
    """Merge ``learned`` into the memo under its lock, so concurrent writers add up instead of tearing it.

    One entry per file path: a file's new identity replaces its old one, so the memo stays as big as
    the set of files ever fingerprinted. Failing to write it only costs a rehash next time.
    """
    try:
        with exclusive_lock(memo_lock(memo_file)):
            memo = _read_memo(memo_file)
            memo.update(learned)
            write_text_atomic(memo_file, json.dumps(memo, indent=0, sort_keys=True))
    except OSError as exc:
        log.warning("could not update %s (%s): the next run hashes these files again", memo_file, exc)


def memo_lock(memo_file: Path) -> Path:
    """The lock file that serialises the memo's read-merge-write (and the sweeping of its temporary files)."""
    return memo_file.with_name(memo_file.name + ".lock")


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()
