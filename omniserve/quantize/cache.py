"""Quantize once, serve many times: ``deploy --quant`` looks here before it quantizes.

An entry is keyed by everything that decides its bytes: the model's content (not its path: a copy
hits, an edited file misses), the method, the recipe's content, the scheme and calibration choices,
and the versions of omniserve, torch, transformers, llm-compressor and compressed-tensors. A hit is
a folder whose report is present (written last, just before the atomic rename), so a crashed run
never looks like a hit. Two processes missing at once both quantize; the first rename wins and the
other's copy is dropped.

A model folder that is already quantized (its config.json has a ``quantization_config``) is
returned as it is, whatever method was asked: quantizing twice would only lose more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from omniserve.quantize.calibration import read_calibration
from omniserve.quantize.checkpoint import content_fingerprint, inspect_checkpoint
from omniserve.quantize.default_set import default_calibration_file
from omniserve.quantize.errors import OutputExists
from omniserve.quantize.options import QuantizeOptions
from omniserve.quantize.recipes import load_recipe
from omniserve.quantize.report import REPORT_JSON, library_versions

log = logging.getLogger("omniserve.quantize")

#: Bumped when omniserve's quantization pipeline changes its output for the same inputs.
CACHE_FORMAT = "1"


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

    ``model`` itself when it is already quantized. Raises the package's ``QuantizeError`` types.
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
    entry = cache_dir / entry_name(
        model,
        method,
        cache_dir=cache_dir,
        recipe=recipe,
        scheme=scheme,
        calibration=calibration,
        num_samples=num_samples,
        max_length=max_length,
        quantize_towers=quantize_towers,
    )
    if is_complete(entry):
        log.info("quantization cache hit: %s", entry)
        return entry
    log.info("quantization cache miss: quantizing %s with %s into %s", model, method, entry)
    from omniserve.quantize.run import quantize

    options = QuantizeOptions(
        model=model,
        method=method,
        output=entry,
        scheme=scheme,
        recipe=recipe,
        calibration=calibration,
        num_samples=num_samples,
        max_length=max_length,
        quantize_towers=quantize_towers,
        overwrite=entry.exists() and not is_complete(entry),  # a leftover without a report is replaced
        device=device,
        progress=progress,
    )
    try:
        return quantize(options).output
    except OutputExists:
        if is_complete(entry):  # another process published the same entry meanwhile
            return entry
        raise


def entry_name(
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
) -> str:
    """``<model folder>-<method>-<16 hex digits of the key>``: readable, and unique per input."""
    loaded = load_recipe(method, recipe)
    calibration_file = Path(calibration) if calibration is not None else default_calibration_file()
    key = {
        "format": CACHE_FORMAT,
        "model": content_fingerprint(model, cache_dir / ".fingerprints.json"),
        "method": method,
        "recipe_sha256": loaded.sha256,
        "scheme": loaded.resolve_scheme(scheme),
        "calibration": _calibration_digest(calibration_file),
        "num_samples": num_samples or loaded.calibration.num_samples,
        "max_length": max_length or loaded.calibration.max_length,
        "quantize_towers": quantize_towers,
        "versions": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).resolve().name) or "model"
    return f"{safe}-{method}-{digest}"


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
