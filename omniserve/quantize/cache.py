"""Quantize once, serve many times: ``deploy --quant`` looks here before it quantizes.

An entry is named ``<stem>-v<maker>`` in two parts. The stem is keyed by the inputs that decide its
bytes: the model's content (not its path: a copy hits, an edited file misses), the method, the recipe's
content, the scheme and calibration choices, and ``CACHE_FORMAT``; it is computed with yaml and pydantic
alone (``read_recipe_defaults``), never with llm-compressor. The maker part digests the versions of the
libraries that quantized it (omniserve, torch, transformers, llm-compressor, compressed-tensors; the same
versions its report records), which the stem leaves out because they differ between environments that
share a cache: the CUDA image's server runs in vLLM's environment, which has its own torch and
compressed-tensors and no llm-compressor, and must serve what the image's quantization environment made.

- An environment that can quantize (llm-compressor importable) serves only the entry its own versions
  make, ``<stem>-v<its maker>``; an entry made with other versions is a miss there, quantized anew
  beside the other one (a published entry is never replaced: other replicas may be serving it).
- An environment that cannot quantize serves any complete ``<stem>-v*`` (the newest), reading and
  writing nothing but the fingerprint memo; with none it refuses in one line (``MissingExtra``, exit 2).

A hit is a folder whose report is present (written last, just before the atomic rename), so a crashed
run never looks like a hit.

Replicas share one cache folder (a Kubernetes volume) and are killed at any moment, so:

- each entry has a lock file beside it (``<entry>.lock``, a ``flock``) held while checking,
  quantizing and publishing. A second process asking for the same entry waits for the first, says
  for whom (the holder's host and pid, written in the lock file), and then gets a hit: one
  quantization, however many replicas start at once. The wait lasts as long as the first run: the
  kernel releases a dead holder's lock at once, so there is no stale lock to time out.
- a killed run's staging folders (``.<entry>.<random>.partial``, ``.<entry>.<random>.old``) and
  half-written memo files are swept when ``ensure_quantized`` starts, each only while holding the
  lock of what it belongs to: a folder that another process is writing right now is left alone.

Every writer of a shared cache folder must take these locks (an omniserve older than them does not),
and the folder's file system must honour ``flock`` across machines (local disks, NFSv4, CephFS and
EFS do; object-store mounts such as s3fs or gcsfuse do not).

A model folder that is already quantized (its config.json has a ``quantization_config``) is
returned as it is, whatever method was asked: quantizing twice would only lose more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omniserve.atomic_files import exclusive_lock, lock_holder, try_exclusive_lock
from omniserve.extras import QUANTIZE_MODULES, MissingExtra, missing_modules, require_extra
from omniserve.quantize.calibration import read_calibration
from omniserve.quantize.checkpoint import content_fingerprint, inspect_checkpoint, memo_lock
from omniserve.quantize.default_set import default_calibration_file
from omniserve.quantize.errors import OutputExists
from omniserve.quantize.options import QuantizeOptions
from omniserve.quantize.publish import sibling_owner
from omniserve.quantize.recipes import read_recipe_defaults
from omniserve.quantize.report import LIBRARIES, REPORT_JSON, library_versions

log = logging.getLogger("omniserve.quantize")

#: Bumped when omniserve's quantization pipeline changes its output for the same inputs.
#: 2: the library versions left the stem for the ``-v<maker>`` part of the name (see the module's docstring).
CACHE_FORMAT = "2"
#: Per-file content digests of the models seen, so a big checkpoint is not re-read on every start.
MEMO_FILE = ".fingerprints.json"
#: The maker part of an entry's name: ``-v`` and this many hex digits of the quantizer versions.
_MAKER_DIGITS = 8
_MAKER_SUFFIX = rf"-v[0-9a-f]{{{_MAKER_DIGITS}}}"
#: What a killed memo write leaves: ``atomic_files``' temporary name, or the pid-named one of older versions.
_MEMO_LEFTOVER = re.compile(rf"^{re.escape(MEMO_FILE)}\.[A-Za-z0-9_]+\.(?:partial\.json|tmp)$")


@dataclass(frozen=True)
class EntryChoices:
    """What decides an entry's bytes besides the model and the method (the quantize choices of deploy --quant)."""

    recipe: Path | None = None
    scheme: str | None = None
    calibration: Path | None = None
    num_samples: int | None = None
    max_length: int | None = None
    quantize_towers: bool = False


def ensure_quantized(
    model: Path,
    method: str,
    *,
    cache_dir: Path,
    recipe: Path | None = None,
    scheme: str | None = None,
    calibration: Path | None = None,
    num_samples: int | None = None,
    max_length: int | None = None,
    quantize_towers: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """The folder to serve for ``model`` quantized with ``method``: cached, freshly made, or ``model`` itself.

    ``model`` itself when it is already quantized. Raises the package's ``QuantizeError`` types, and
    ``MissingExtra`` on a miss where the quantize extra is not installed. A hit is answered without
    taking the lock (a published entry never changes), so a cache volume mounted read-only still
    serves its entries, and without importing the quantization libraries, so vLLM's environment can.
    """
    model = Path(model)
    info = inspect_checkpoint(model)
    if info.quant_method is not None:
        log.warning(
            "%s is already quantized (%s): serving it as it is, --quant %s not applied",
            model,
            info.quant_method,
            method,
        )
        return model
    cache_dir = Path(cache_dir)
    choices = EntryChoices(recipe, scheme, calibration, num_samples, max_length, quantize_towers)
    if missing_modules(QUANTIZE_MODULES):
        return _made_elsewhere(model, method, cache_dir=cache_dir, choices=choices)
    entry = cache_dir / entry_name(model, method, cache_dir=cache_dir, choices=choices)
    sweep_stale(cache_dir)
    if is_complete(entry):
        log.info("quantization cache hit: %s", entry)
        return entry
    started = time.monotonic()
    waited_for: list[str] = []

    def say_whom(holder: str) -> None:
        waited_for.append(holder)
        log.info("quantization cache: %s is being written by %s; waiting for that run to finish", entry.name, holder)

    with exclusive_lock(entry_lock(entry), on_wait=say_whom):
        if waited_for:
            log.info("quantization cache: waited %.1f s for %s", time.monotonic() - started, waited_for[0])
        if is_complete(entry):
            log.info("quantization cache hit: %s", entry)
            return entry
        # leftovers of this entry that appeared while we waited (its writer was killed): ours to remove now
        for leftover in _leftovers(cache_dir).get(entry_lock(entry), []):
            _remove(leftover)
        # the miss path, checked again under the lock: only quantizing needs the extra (a hit never does)
        require_extra("quantize", QUANTIZE_MODULES)
        log.info("quantization cache miss: quantizing %s with %s into %s", model, method, entry)
        from omniserve.quantize.run import quantize

        options = QuantizeOptions(
            model=model,
            method=method,
            output=entry,
            **dataclasses.asdict(choices),
            overwrite=entry.exists(),  # not complete (checked above): an empty or legacy leftover, replaced
            device=device,
            progress=progress,
        )
        try:
            return quantize(options).output
        except OutputExists:
            if is_complete(entry):  # published meanwhile by a writer that ignores the lock (an older omniserve)
                return entry
            raise


def _made_elsewhere(
    model: Path,
    method: str,
    *,
    cache_dir: Path,
    choices: EntryChoices,
) -> Path:
    """Where the quantize extra is missing: the newest complete entry of the stem, whoever made it.

    No lock and no sweep: this process will write no entry, so it has nothing to guard, and a cache
    volume mounted read-only must still serve. The model is fingerprinted only when the folder holds an
    entry for its name and method at all, so a plain miss costs nothing before the one-line refusal.
    """
    if _complete_entries(cache_dir, re.escape(f"{_safe_name(model)}-{method}-") + "[0-9a-f]{16}"):
        stem = entry_stem(model, method, cache_dir=cache_dir, choices=choices)
        made = sorted(
            _complete_entries(cache_dir, re.escape(stem)), key=lambda e: ((e / REPORT_JSON).stat().st_mtime_ns, e.name)
        )
        if made:
            log.info("quantization cache hit: %s (made by another environment's libraries)", made[-1])
            return made[-1]
    raise MissingExtra("quantize", missing_modules(QUANTIZE_MODULES))


def _complete_entries(cache_dir: Path, stem: str) -> list[Path]:
    """The complete entries, made by any libraries, whose stem matches the regular expression ``stem``."""
    pattern = re.compile(rf"^{stem}{_MAKER_SUFFIX}$")
    try:
        names = [p.name for p in cache_dir.iterdir()]
    except OSError:
        return []
    return [cache_dir / n for n in names if pattern.match(n) and is_complete(cache_dir / n)]


def entry_lock(entry: Path) -> Path:
    """``<entry>.lock`` beside the entry; never deleted (see ``atomic_files``)."""
    return entry.with_name(entry.name + ".lock")


def sweep_stale(cache_dir: Path) -> list[Path]:
    """Delete what killed runs left in ``cache_dir``; return what was removed.

    A leftover is removed only while holding the lock of the entry (or memo) it belongs to, taken
    without waiting: whoever holds it may be writing that very folder, so it is left for a later sweep.
    Errors (a read-only volume, a folder removed by another sweeper) leave things as they are.
    """
    if not Path(cache_dir).is_dir():
        return []
    removed: list[Path] = []
    for lock, paths in sorted(_leftovers(Path(cache_dir)).items()):
        with try_exclusive_lock(lock) as held:
            if not held:
                log.info(
                    "quantization cache: left %s alone: %s holds %s",
                    ", ".join(p.name for p in paths),
                    lock_holder(lock),
                    lock.name,
                )
                continue
            removed.extend(path for path in paths if _remove(path))
    return removed


def _leftovers(cache_dir: Path) -> dict[Path, list[Path]]:
    """Staging / set-aside folders and temporary memo files, grouped by the lock that guards them."""
    found: dict[Path, list[Path]] = {}
    try:
        names = sorted(p.name for p in cache_dir.iterdir())
    except OSError:
        return found
    for name in names:
        owner = sibling_owner(name)
        if owner is not None:
            found.setdefault(entry_lock(cache_dir / owner), []).append(cache_dir / name)
        elif _MEMO_LEFTOVER.match(name):
            found.setdefault(memo_lock(cache_dir / MEMO_FILE), []).append(cache_dir / name)
    return found


def _remove(path: Path) -> bool:
    """Delete a leftover file or folder (its lock held); False if it was already gone or cannot go."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("quantization cache: could not remove %s: %s", path, exc)
        return False
    log.info("quantization cache: removed %s, left by a run that was killed", path.name)
    return True


def entry_name(model: Path, method: str, *, cache_dir: Path, choices: EntryChoices = EntryChoices()) -> str:
    """``<stem>-v<maker>``: the entry that this environment's libraries make (and, quantizing, serve)."""
    stem = entry_stem(model, method, cache_dir=cache_dir, choices=choices)
    return f"{stem}-v{maker_key(library_versions())}"


def maker_key(versions: dict[str, str]) -> str:
    """8 hex digits of the versions of ``LIBRARIES``: a report's ``versions`` field gives its entry's maker part."""
    chosen = {name: versions.get(name, "absent") for name in LIBRARIES}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:_MAKER_DIGITS]


def entry_stem(model: Path, method: str, *, cache_dir: Path, choices: EntryChoices = EntryChoices()) -> str:
    """``<model folder>-<method>-<16 hex digits of the key>``: readable, unique per input, equal in every environment.

    No library version and no llm-compressor import goes into it (see the module's docstring).
    """
    loaded = read_recipe_defaults(method, choices.recipe)
    calibration = choices.calibration
    calibration_file = Path(calibration) if calibration is not None else default_calibration_file()
    key = {
        "format": CACHE_FORMAT,
        "model": content_fingerprint(model, cache_dir / MEMO_FILE),
        "method": method,
        "recipe_sha256": loaded.sha256,
        "scheme": loaded.resolve_scheme(choices.scheme),
        "calibration": _calibration_digest(calibration_file),
        "num_samples": choices.num_samples or loaded.calibration.num_samples,
        "max_length": choices.max_length or loaded.calibration.max_length,
        "quantize_towers": choices.quantize_towers,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{_safe_name(model)}-{method}-{digest}"


def _safe_name(model: Path) -> str:
    """The model folder's name, reduced to characters every file system and shell takes as they are."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).resolve().name) or "model"


def is_complete(entry: Path) -> bool:
    """A published entry: config.json and the report (the last file written before the rename)."""
    return (entry / "config.json").is_file() and (entry / REPORT_JSON).is_file()


def _calibration_digest(jsonl: Path) -> str:
    """The JSONL's bytes and those of every media file it names (relative paths resolve beside it)."""
    digest = hashlib.sha256(jsonl.read_bytes())
    for sample in read_calibration(jsonl):
        for message in sample.messages:
            parts = message.content if isinstance(message.content, list) else []
            for part in parts:
                url = _part_url(part)
                if url and "://" not in url and not url.startswith("data:"):
                    file = Path(url) if Path(url).is_absolute() else jsonl.parent / url
                    if file.is_file():
                        digest.update(file.read_bytes())
    return digest.hexdigest()


def _part_url(part: object) -> str | None:
    for attr in ("image_url", "video_url", "audio_url"):
        holder = getattr(part, attr, None)
        if holder is not None:
            return holder.url
    return None
