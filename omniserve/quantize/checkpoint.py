"""Facts about a checkpoint folder read from disk: is it one, is it quantized, how big, what content.

Everything here reads files only (no torch), so the CLI can refuse a bad folder, an already
quantized one or a full disk in milliseconds, before minutes of imports and loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.quantize.errors import AlreadyQuantized, NotACheckpoint, NotEnoughDisk

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Files read by the weight loader; everything else in a checkpoint folder is copied beside the output.
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Free space kept in reserve beyond the estimate (config, tokenizer, report, filesystem slack).
_DISK_MARGIN_BYTES = 64 * 1024 * 1024


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
    ``memo_file`` keyed by (absolute path, size, modification time); an unchanged file is not reread.
    """
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    outer = hashlib.sha256()
    changed = False
    for file in sorted(f for f in Path(path).rglob("*") if f.is_file()):
        stat = file.stat()
        memo_key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = memo.get(memo_key)
        if digest is None:
            digest = _file_sha256(file)
            memo[memo_key] = digest
            changed = True
        outer.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
    if memo_file is not None and changed:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, memo_file)
    return outer.hexdigest()


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()
