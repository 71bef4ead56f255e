"""One quantization run, start to finish: check, calibrate, quantize, save, verify, report, publish.

Order matters for the user's time and disk: everything that can be refused from files alone
(method, scheme, recipe, folder, already quantized, output exists, free space, calibration file)
is refused before torch is imported; the output is written to a hidden sibling folder and renamed
into place only after verification passed, so it is complete or absent.

What is quantized: the text decoder's Linear layers, handed to llm-compressor as a module on its
own (``capture.py`` explains why and how the towers still see the calibration media). With
``--quantize-towers`` the whole language model is handed over with the basic pipeline instead (a
full forward per sample), and only ``lm_head`` and the embeddings are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError
from omniserve.quantize.calibration import CalibrationSample, EncodedSample, encode, read_calibration, usable
from omniserve.quantize.checkpoint import (
    CheckpointInfo,
    check_free_space,
    folder_bytes,
    inspect_checkpoint,
    is_weight_file,
    refuse_quantized,
)
from omniserve.quantize.default_set import default_calibration_file
from omniserve.quantize.errors import (
    CalibrationDataError,
    InvalidQuantizeOption,
    NotACheckpoint,
    QuantizationFailed,
)
from omniserve.quantize.options import QuantizeOptions
from omniserve.quantize.publish import check_output, disk_full_as_error, make_readable, publish
from omniserve.quantize.recipes import Recipe, load_recipe
from omniserve.quantize.report import Report

log = logging.getLogger("omniserve.quantize")

#: llm-compressor's warning when its sequential pipeline could not split the model into layers.
_TRACE_FAILURE = "only traced"


@dataclass
class QuantizeResult:
    output: Path
    report: Report


@dataclass
class Plan:
    """What the cheap checks established; the expensive part runs from it."""

    options: QuantizeOptions
    recipe: Recipe
    scheme: str
    info: CheckpointInfo
    calibration_file: Path
    samples: list[CalibrationSample]
    num_samples: int
    max_length: int


def quantize(options: QuantizeOptions) -> QuantizeResult:
    """Quantize ``options.model`` into ``options.output`` and return the published folder and its report."""
    plan = prepare(options)
    return execute(plan)


def prepare(options: QuantizeOptions) -> Plan:
    """Every check that needs only files: fails in well under a second, before any model is loaded."""
    recipe = load_recipe(options.method, options.recipe)
    scheme = recipe.resolve_scheme(options.scheme)
    if options.quantize_towers and any("AWQModifier" in entry for entry in recipe.modifiers):
        raise InvalidQuantizeOption(
            "--quantize-towers does not work with AWQ: its smoothing mappings are defined for decoder layers only "
            "(tower layers would be grouped with the wrong norms); use gptq or fp8 to quantize towers"
        )
    info = inspect_checkpoint(options.model)
    refuse_quantized(info)
    output = Path(options.output)
    check_output(output, info.path, overwrite=options.overwrite)
    check_free_space(output.parent, info.weight_bytes)
    calibration_file = Path(options.calibration) if options.calibration is not None else default_calibration_file()
    samples = read_calibration(calibration_file)
    return Plan(
        options=options,
        recipe=recipe,
        scheme=scheme,
        info=info,
        calibration_file=calibration_file,
        samples=samples,
        num_samples=options.num_samples or recipe.calibration.num_samples,
        max_length=options.max_length or recipe.calibration.max_length,
    )


# ----------------------------------------------------------------------------------- the run


def execute(plan: Plan) -> QuantizeResult:
    """The expensive part: load, calibrate, quantize, save, verify, publish."""
    from omniserve.logs import library_output, quiet_llmcompressor
    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.hardware import check_scheme_runs
    from omniserve.quantize.layout import find_layout
    from omniserve.quantize.verify import digests, forward_logits, verify
    from omniserve.templates.render import PromptRenderer

    options = plan.options
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    quiet_llmcompressor()  # before the hardware probe, which runs llm-compressor too
    device = _resolve_device(options.device)
    needs_data = plan.recipe.needs_calibration(plan.scheme)
    with library_output("the hardware probe"):  # llm-compressor's bars; omniserve's lines and bars are the display
        check_scheme_runs(plan.scheme, device, (_checkpoint_dtype(plan.info), "float32"))

    with _timed(seconds, "load"):
        try:
            renderer = PromptRenderer.from_pretrained(plan.info.path)
            # the checkpoint's own dtype; its load report is verify()'s business, on the quantized result
            model = load_checkpoint(plan.info.path, dtype="auto", device=device, allow_auto_dtype=True).model
        except (ModelLoadError, OSError, ValueError, KeyError) as exc:
            raise NotACheckpoint(f"cannot load {plan.info.path}: {exc}") from exc
        layout = find_layout(model)
    param = next(layout.lm.parameters())

    with _timed(seconds, "encode"):
        calibration, held_out, skipped = _choose_samples(plan, renderer.modalities, needs_data)
        encoded = _encode_all([*calibration, *held_out], renderer, plan, options.progress)
        calib_encoded, held_encoded = encoded[: len(calibration)], encoded[len(calibration) :]
        references = [forward_logits(layout.lm, s, param.device, param.dtype) for s in held_encoded]

    scope, scope_name = layout.scope(options.quantize_towers)
    modifiers = plan.recipe.build_modifiers(scheme=plan.scheme, ignore=layout.scope_ignore(options.quantize_towers))
    targeted = _targeted(scope, scope_name, modifiers)
    if not targeted:
        raise QuantizationFailed(f"the recipe {plan.recipe.source} targets no module of {plan.info.path}")
    _check_groups(model, targeted, plan.scheme, alternatives=sorted(plan.recipe.schemes))
    kept = digests(model, layout.kept_parameters(targeted))

    pipeline = "datafree"
    dataset = None
    with _timed(seconds, "quantize"):
        if needs_data:
            if options.quantize_towers:
                pipeline, batches = "basic", [s.batch(param.device, param.dtype) for s in calib_encoded]
            else:
                from omniserve.quantize.capture import decoder_inputs

                pipeline, batches = "sequential", decoder_inputs(layout, calib_encoded, progress=options.progress)
            from torch.utils.data import DataLoader

            dataset = DataLoader(batches, batch_size=None, collate_fn=_identity)
        warnings_seen = _run_oneshot(scope, plan, modifiers, dataset, renderer.processor, pipeline)
        quantized = sorted(name for name, m in model.named_modules() if hasattr(m, "quantization_scheme"))
        if not quantized:
            raise QuantizationFailed("llm-compressor returned without quantizing any module")

    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        with _timed(seconds, "save"), disk_full_as_error(staging), library_output("compressed-tensors (saving)"):
            kept_linear = _save(model, renderer.processor, plan.info, staging, layout.decoder_name)
        del model, layout, scope, modifiers, param
        _release_memory()  # the original model is not needed for verification: reload next to it, not on top
        with _timed(seconds, "verify"), library_output("compressed-tensors (reloading)"):
            verification = verify(staging, kept=kept, held_out=held_encoded, references=references, device=device)
        seconds["total"] = round(time.perf_counter() - clock, 3)
        report = _report(plan, staging, seconds, pipeline, calib_encoded, skipped, quantized, kept_linear)
        report.verification = {
            "load_report": verification.load_report,
            "kept_parameters_checked": verification.kept_checked,
            "kept_parameters_unchanged": True,
        }
        report.fidelity = verification.fidelity.as_dict() if verification.fidelity else None
        report.library_warnings = warnings_seen
        report.write(staging)
        make_readable(staging)
        publish(staging, output, overwrite=options.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("quantized checkpoint written to %s", output)
    return QuantizeResult(output=output, report=report)


def _choose_samples(
    plan: Plan, modalities: frozenset[str], needs_data: bool
) -> tuple[list[CalibrationSample], list[CalibrationSample], Counter]:
    """Calibration samples from the start of the file, held-out ones from its end (at most half)."""
    readable, skipped = usable(plan.samples, modalities)
    if not readable:
        lacking = ", ".join(f"{n} {k}" for k, n in skipped.items())
        raise CalibrationDataError(
            f"no sample this model can read (it takes {', '.join(sorted(modalities))}; samples need {lacking})",
            source=plan.calibration_file,
        )
    hold = min(plan.options.fidelity_samples, len(readable) // 2)
    pool, held_out = readable[: len(readable) - hold], readable[len(readable) - hold :]
    calibration = pool[: plan.num_samples] if needs_data else []
    if needs_data and len(pool) < plan.num_samples:
        log.warning(
            "%s has %d usable calibration samples (after holding out %d); using them instead of %d",
            plan.calibration_file,
            len(pool),
            hold,
            plan.num_samples,
        )
    return calibration, held_out, skipped


def _encode_all(samples: Sequence[CalibrationSample], renderer: Any, plan: Plan, progress: bool) -> list[EncodedSample]:
    from tqdm.auto import tqdm

    return [
        encode(s, renderer, max_length=plan.max_length, limits=plan.options.media)
        for s in tqdm(samples, desc="Encoding calibration samples", disable=not progress)
    ]


def _targeted(scope: Any, scope_name: str, modifiers: list[Any]) -> set[str]:
    """Full names of the modules the quantizing modifier will quantize."""
    from compressed_tensors.utils import match_named_modules

    from omniserve.quantize.layout import qualified

    quantizer = next(m for m in modifiers if hasattr(m, "scheme"))
    targets = [quantizer.targets] if isinstance(quantizer.targets, str) else list(quantizer.targets)
    return {qualified(scope_name, name) for name, _ in match_named_modules(scope, targets, quantizer.ignore)}


def _check_groups(model: Any, targeted: set[str], scheme: str, alternatives: list[str]) -> None:
    """Refuse a group-wise scheme for layers whose input width the group size does not divide.

    llm-compressor would fail deep inside calibration ("unflatten: Provided sizes [-1, 128] don't
    multiply up to ..."); small tower layers (``--quantize-towers``) are the usual culprits. The
    message names the recipe's schemes that would fit, computed from the presets (compressed-tensors
    has changed presets between releases, e.g. W8A16 became group-wise).
    """
    widths = {name: module.in_features for name, module in model.named_modules() if name in targeted}
    group = _group_size(scheme)
    bad = [f"{name} ({width})" for name, width in widths.items() if group and isinstance(width, int) and width % group]
    if not bad:
        return
    fitting = [
        other
        for other in alternatives
        if other != scheme
        and not any(_group_size(other) and isinstance(w, int) and w % _group_size(other) for w in widths.values())
    ]
    advice = f"choose a scheme that fits them (--scheme {' | '.join(fitting)})" if fitting else "use another method"
    raise InvalidQuantizeOption(
        f"scheme {scheme} quantizes weights in groups of {group} input channels, which does not divide the "
        f"width of {len(bad)} targeted layer(s): {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. "
        f"Keep them in full precision (no --quantize-towers) or {advice}"
    )


def _group_size(scheme: str) -> int | None:
    """The preset's weight group size, or None for per-channel / per-tensor schemes."""
    from compressed_tensors.quantization import preset_name_to_scheme

    weights = preset_name_to_scheme(scheme, ["Linear"]).weights
    if weights is None or str(getattr(weights, "strategy", "")).lower().split(".")[-1] != "group":
        return None
    return getattr(weights, "group_size", None)


def _run_oneshot(
    scope: Any, plan: Plan, modifiers: list[Any], dataset: Any, processor: Any, pipeline: str
) -> list[str]:
    """Run llm-compressor on ``scope``; return its warnings (unique, in order), failing on a silent no-op."""
    from llmcompressor import oneshot
    from loguru import logger

    from omniserve.logs import library_output, quiet_llmcompressor
    from omniserve.quantize.patches import awq_without_accelerator

    seen: list[str] = []

    def sink(message: Any) -> None:
        text = str(message.record["message"]).strip()
        if text not in seen:
            seen.append(text)

    # oneshot re-reads config.json from name_or_path to refuse already-quantized models; a sub-module's
    # config (the thinker's text config) has none of its own
    scope.config._name_or_path = str(plan.info.path)
    quiet_llmcompressor()  # its own console lines follow omniserve's --log-level; warnings still reach the report
    sink_id = logger.add(sink, level="WARNING")
    uses_awq = any("AWQModifier" in entry for entry in plan.recipe.modifiers)
    try:
        with awq_without_accelerator(active=uses_awq), library_output("llm-compressor"):
            oneshot(
                model=scope,
                recipe=modifiers,
                dataset=dataset,
                processor=processor,
                pipeline="basic" if pipeline == "basic" else "independent",
            )
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise QuantizationFailed(f"llm-compressor failed: {type(exc).__name__}: {exc}") from exc
    finally:
        logger.remove(sink_id)
    trace_failures = [w for w in seen if _TRACE_FAILURE in w]
    if trace_failures:
        raise QuantizationFailed(
            "llm-compressor could not split the model into layers, so calibration would silently do nothing: "
            + trace_failures[0]
        )
    return seen


def _release_memory() -> None:
    """Drop llm-compressor's session (it holds the model) and collect, so the reload does not double memory."""
    import gc

    import torch
    from llmcompressor.core import active_session

    active_session().reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _identity(batch: Any) -> Any:
    return batch


def _save(model: Any, processor: Any, info: CheckpointInfo, folder: Path, decoder_name: str) -> list[str]:
    """Write weights (compressed), config, processor and the source's other files; return kept Linear names."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    modify_save_pretrained(model)
    with warnings.catch_warnings():
        # llm-compressor hands the model to accelerate's offloaded saver, which warns about a 50 GB shard size
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(str(folder), save_compressed=True)
    processor.save_pretrained(str(folder))
    for file in sorted(info.path.iterdir()):
        target = folder / file.name
        if file.is_file() and not is_weight_file(file) and not target.exists():
            shutil.copy2(file, target)
    return fix_ignore_names(folder / "config.json", model, decoder_name)


def fix_ignore_names(config_file: Path, model: Any, decoder_name: str) -> list[str]:
    """Rewrite the saved ``ignore`` list so every reader finds the kept layers (see ``ignore.py``)."""
    from omniserve.quantize.ignore import saved_ignore

    config = json.loads(config_file.read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise QuantizationFailed(f"{config_file} has no quantization_config after saving")
    qc["ignore"], kept = saved_ignore(list(qc.get("ignore") or []), model, decoder_name)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return kept


def _report(
    plan: Plan,
    folder: Path,
    seconds: dict[str, float],
    pipeline: str,
    calibration: Sequence[EncodedSample],
    skipped: Counter,
    quantized: list[str],
    kept: list[str],
) -> Report:
    config = json.loads((folder / "config.json").read_text())
    by_modality: Counter[str] = Counter()
    for sample in calibration:
        by_modality.update(sorted(sample.modalities) or ["text"])
    options = plan.options
    return Report(
        model=plan.info.path.name,
        architecture=(plan.info.config.get("architectures") or ["?"])[0],
        method=plan.recipe.method,
        scheme=plan.scheme,
        recipe={"path": str(plan.recipe.source), "sha256": plan.recipe.sha256},
        quantization_format=f"compressed-tensors, {config['quantization_config'].get('format')}",
        size_before_bytes=plan.info.weight_bytes,
        size_after_bytes=folder_bytes(folder),
        seconds=seconds,
        calibration={
            "file": str(plan.calibration_file),
            "used": len(calibration),
            "by_modality": dict(by_modality),
            "tokens": sum(len(s.token_ids) for s in calibration),
            "skipped": dict(skipped),
            "max_length": plan.max_length,
            "pipeline": pipeline,
        },
        quantized_modules=quantized,
        kept_modules=kept,
        verification={},
        fidelity=None,
        options={
            "quantize_towers": options.quantize_towers,
            "num_samples": plan.num_samples,
            "fidelity_samples": options.fidelity_samples,
            "device": options.device,
        },
    )


# ----------------------------------------------------------------------------------- helpers


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidQuantizeOption(f"--device {device}: no CUDA device is available on this machine")
    return device


def _checkpoint_dtype(info: CheckpointInfo) -> str:
    """The dtype the checkpoint is stored in (what the probe must also try), float32 if it does not say."""
    config = info.config
    for section in (config, config.get("text_config") or {}, config.get("thinker_config") or {}):
        value = section.get("dtype") or section.get("torch_dtype")
        if isinstance(value, str) and value in ("float32", "bfloat16", "float16"):
            return value
    return "float32"


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 3)
