"""The one way omniserve loads a checkpoint folder into a transformers model: serving, training, quantizing.

Every reader must load a checkpoint the same way, or a quantized model verified by ``omniserve
quantize`` is not the model ``deploy`` serves. So this module alone:

- picks the class ``config.json`` names (``architectures[0]``; ``AutoModelForCausalLM`` when
  transformers does not know it), so an Omni checkpoint loads as the Omni model, not its text part;
- resolves the dtype name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, and
  ``auto`` where a caller allows it: the checkpoint's own dtype);
- dequantizes compressed-tensors checkpoints at load (``omniserve quantize``, llm-compressor), see
  ``load_checkpoint``; where the compressed-tensors package is missing it refuses in one line that names
  the extra (``omniserve.extras``) before loading any weight;
- leaves published GPTQ/AWQ checkpoints to transformers' integration (GPTQModel's CPU kernels), or refuses
  them in one line when that library is missing (``omniserve.models.published_quant``);
- captures transformers' LOAD REPORT and parses it into rows (MISSING / UNEXPECTED / MISMATCH /
  CONVERSION). transformers logs that table and carries on with random or dropped weights;
  ``from_pretrained(..., output_loading_info=True)`` would return the same facts but breaks in
  Qwen2.5-Omni's ``from_pretrained`` override (transformers 5.17), so the log is read instead.

It decides nothing about the report: the transformers engine and training refuse MISSING weights
(``refuse_missing``), quantize's verification fails on any row. Importing this module stays cheap:
torch and transformers are imported when a checkpoint is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.errors import ModelLoadError
from omniserve.extras import COMPRESSED_TENSORS_MODULES, require_extra

#: Accepted dtype names -> torch attribute names.
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
#: The row statuses of a LOAD REPORT that mean the model is not the checkpoint.
REPORT_STATUSES = ("MISSING", "UNEXPECTED", "MISMATCH", "CONVERSION")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # transformers colours the table when stdout is a terminal


@dataclass(frozen=True)
class LoadReportRow:
    status: str  # one of REPORT_STATUSES
    key: str  # the weight's name, as transformers prints it

    def __str__(self) -> str:
        return f"{self.status}: {self.key}"


@dataclass
class LoadReport:
    """What transformers' LOAD REPORT said: parsed rows, and whole reports in a layout the parser does not know.

    An unknown layout is kept rather than dropped, so a strict reader (quantize's verification)
    fails on it instead of passing a model it could not check.
    """

    rows: list[LoadReportRow] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.unparsed)

    def keys(self, status: str) -> list[str]:
        return [row.key for row in self.rows if row.status == status]

    @property
    def missing(self) -> list[str]:
        """Weights the model has and the checkpoint lacks: transformers initialised them at random."""
        return self.keys("MISSING")

    def lines(self) -> list[str]:
        """Every finding as one line (``MISSING: model.norm.weight``), for messages and reports."""
        return [str(row) for row in self.rows] + self.unparsed

    def add(self, message: str) -> None:
        """Parse one transformers log message; anything that is not a LOAD REPORT is ignored."""
        message = _ANSI.sub("", message)
        if "LOAD REPORT" not in message:
            return
        found = []
        for line in message.splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) >= 2 and cells[1] in REPORT_STATUSES:
                found.append(LoadReportRow(status=cells[1], key=cells[0]))
        if found:
            self.rows.extend(found)
        else:
            self.unparsed.append(message.strip())


def parse_load_report(messages: Iterable[str]) -> LoadReport:
    """The report held in already captured transformers log messages."""
    report = LoadReport()
    for message in messages:
        report.add(message)
    return report


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextlib.contextmanager
def capture_load_report() -> Iterator[LoadReport]:
    """Collect every LOAD REPORT transformers logs inside the block.

    The report is a warning: with transformers' verbosity set above WARNING it would never be
    logged and a broken checkpoint would pass. So the ``transformers`` logger is opened to
    warnings for the block, while its own handlers keep printing only what the user's verbosity
    lets through.
    """
    report = LoadReport()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            report.add(record.getMessage())

    logger = logging.getLogger("transformers")
    level, effective = logger.level, logger.getEffectiveLevel()
    quiet = _AtLeast(effective)
    printing = list(logger.handlers)
    for handler in printing:
        handler.addFilter(quiet)
    collect = _Collect(level=logging.WARNING)
    logger.addHandler(collect)
    if effective > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield report
    finally:
        logger.setLevel(level)
        logger.removeHandler(collect)
        for handler in printing:
            handler.removeFilter(quiet)


@dataclass
class LoadedCheckpoint:
    model: Any  # the class config.json names, in eval mode, on the requested device
    config: Any  # transformers' config of the checkpoint
    dtype: Any  # the torch dtype asked for, or "auto" (then the model's own: ``model.dtype``)
    report: LoadReport  # empty when the weights and the model line up
    dequantized: bool  # a compressed-tensors checkpoint, now holding plain dense weights


def resolve_dtype(name: str, *, allow_auto: bool = False) -> Any:
    """The torch dtype a name means (``"auto"`` stays ``"auto"`` when allowed); ``ModelLoadError`` otherwise."""
    if allow_auto and name == "auto":
        return "auto"
    if name not in DTYPES:
        choices = sorted(set(DTYPES.values())) + (["auto"] if allow_auto else [])
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {choices}")
    import torch

    return getattr(torch, DTYPES[name])


def is_compressed_tensors(config: Any) -> bool:
    """Whether a transformers config describes a compressed-tensors checkpoint."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return method == "compressed-tensors"


def model_class(config: Any) -> Any:
    """The class ``architectures[0]`` names, or ``AutoModelForCausalLM`` when transformers has no such class."""
    import transformers

    arch = (getattr(config, "architectures", None) or [""])[0]
    return getattr(transformers, arch, None) or transformers.AutoModelForCausalLM


def generating_module(model: Any) -> Any:
    """The module that maps (input_ids, media) to logits: the thinker of an Omni model, the model otherwise."""
    return model.thinker if hasattr(model, "thinker") else model


def refuse_missing(path: Path, report: LoadReport) -> None:
    """Raise ``ModelLoadError`` when the checkpoint lacks weights the model needs.

    transformers would run those as freshly random weights: serving or fine-tuning such a model
    answers nonsense, so both refuse instead.
    """
    missing = report.missing
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{path} lacks weights the model needs ({shown}); the checkpoint is incomplete")


def load_checkpoint(
    path: Path, *, dtype: str = "float32", device: str | None = "cpu", allow_auto_dtype: bool = False
) -> LoadedCheckpoint:
    """Load ``path`` with the class its config names, dequantized if compressed, and its LOAD REPORT.

    Raises ``ModelLoadError`` for a folder without ``config.json``, an unknown dtype name, or a
    checkpoint transformers cannot read. The report is returned, not judged: see ``refuse_missing``.
    ``device=None`` leaves the model where transformers put it.

    compressed-tensors checkpoints are dequantized at load. Left compressed, transformers
    decompresses them in a forward pre-hook on the top-level model only, which never fires when an
    inner module is called (the Omni thinker: "'Linear' object has no attribute 'weight'"), and
    CPUs have no int4/FP8 matmul for the compressed layers anyway.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a checkpoint folder (no config.json)")
    torch_dtype = resolve_dtype(dtype, allow_auto=allow_auto_dtype)
    from transformers import AutoConfig

    from omniserve.models.families import check_supported
    from omniserve.models.published_quant import require_transformers_support

    check_supported(path)  # an unknown architecture: named, with the nearest supported family

    try:
        config = AutoConfig.from_pretrained(str(path))
        # a published GPTQ/AWQ folder runs through transformers' integration (GPTQModel), or is refused here
        require_transformers_support(path, config)
        dequantize = is_compressed_tensors(config)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if dequantize:
            # without it transformers fails inside from_pretrained with a traceback; say so before loading anything
            require_extra(
                "quantize",
                COMPRESSED_TENSORS_MODULES,
                purpose=f"needed to load the compressed-tensors checkpoint {path}",
            )
            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            # "You passed `quantization_config` ... loading attributes will be overwritten": that is the point.
            # A process-wide filter, not catch_warnings: the engine loads in a worker thread, and
            # catch_warnings restores the filter list of the whole process when it exits.
            warnings.filterwarnings("ignore", message=".*`quantization_config`", category=UserWarning)
        with capture_load_report() as report:
            model = model_class(config).from_pretrained(str(path), **kwargs)
        if dequantize:
            from compressed_tensors.offload import remove_dispatch

            # dequantizing leaves every weight behind compressed-tensors' offload wrapper, which keeps it on the
            # CPU through .to(device) and re-fetches it on each access: give the model plain parameters
            remove_dispatch(model, onload_tensors=True)
        _restore_model_args(model.config, config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedCheckpoint(model=model, config=config, dtype=torch_dtype, report=report, dequantized=dequantize)


def _restore_model_args(built: Any, read: Any) -> None:
    """Put back the timm ``model_args`` of ``built`` (the model's config) from ``read`` (the same config.json, read
    apart): transformers hands ``TimmWrapperConfig.model_args`` to ``timm.create_model`` as they are, and timm's
    block builder rewrites decoded ``block_args`` in place (timm 1.0.31: ``block_type`` popped, layer classes and
    partials added). Left so, the model's config no longer serializes (training's and quantize's save fail with
    "Object of type partial is not JSON serializable") and cannot build a second model (Gemma 3n's tiny vision
    tower; published checkpoints name the architecture alone and pass no block arguments)."""
    import copy

    for name in ("", *(getattr(built, "sub_configs", None) or {})):
        mine, theirs = (built, read) if not name else (getattr(built, name, None), getattr(read, name, None))
        if getattr(mine, "model_args", None) is not None and theirs is not None:
            mine.model_args = copy.deepcopy(theirs.model_args)
