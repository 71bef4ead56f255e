"""Tiny checkpoints in the published GPTQ and AWQ layouts, written without the tools that produce them.

Model publishers ship 4-bit checkpoints made by AutoGPTQ / GPTQModel (``quant_method: gptq``) and
AutoAWQ (``quant_method: awq``, ``version: gemm``). The producing tool, gptqmodel, is an sdist whose
dependencies pin numpy 2.2.6 and which does not install in the vLLM environment, so the tests write the
same bytes here: round-to-nearest codes (not GPTQ's or AWQ's search; the layout is what a reader sees)
packed exactly as gptqmodel 7.6.0 writes them, which is also AutoGPTQ 0.7's and AutoAWQ 0.2's layout:

- GPTQ, ``checkpoint_format: gptq`` (v1): per linear ``qweight`` int32 ``[in/8, out]`` with eight 4-bit
  codes packed along the *input* dimension, low bits first; ``qzeros`` int32 ``[groups, out/8]`` holding
  ``zero - 1`` (the v1 off-by-one) packed along the output dimension; ``scales`` float16 ``[groups, out]``;
  ``g_idx`` int32 ``[in]`` (``i // group_size``, no act-order). ``w = scale * (q - (stored_zero + 1))``.
- AWQ GEMM: ``qweight`` int32 ``[in, out/8]`` packed along the *output* dimension in the interleaved
  order ``0, 2, 4, 6, 1, 3, 5, 7``; ``qzeros`` int32 ``[groups, out/8]`` in the same order (no off-by-one);
  ``scales`` ``[groups, out]``. ``w = scale * (q - zero)``.

``test_published_quant`` checks these writers against the tool: where gptqmodel is importable it
quantizes the same model and the tensors it writes unpack and re-pack through these functions to the
same bytes; the vLLM tests check that vLLM's readers compute what the dequantized reference computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

#: AutoAWQ's packing order: position j of a packed int32 holds output column ``AWQ_ORDER[j]`` of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: The linear layers publishers quantize in a decoder layer (embeddings, norms and lm_head stay dense).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = 4
_PACK = 32 // BITS


def quantize_rtn(weight: torch.Tensor, group_size: int, *, sym: bool) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest 4-bit codes of ``weight`` ``[out, in]``: (codes, zeros ``[out, groups]``, scales)."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    if sym:
        scales = (w.abs().amax(-1) / 7.5).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8)
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = ((high - low) / 15).clamp(min=1e-8)
        zeros = torch.round(-low / scales).clamp(0, 15)
    scales = scales.half().float()  # the stored precision, so codes and dequantization agree
    codes = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return codes.reshape(out_features, in_features).int(), zeros.int(), scales.half()


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a reader computes from codes, zeros and scales (``[out, groups]``)."""
    groups = torch.arange(codes.shape[1]) // group_size
    return (codes.float() - zeros.float()[:, groups]) * scales.float()[:, groups]


def _pack_rows(values: torch.Tensor) -> torch.Tensor:
    """Pack ``[rows, cols]`` 4-bit values eight rows to one int32 row, row ``8r + j`` at bits ``4j``."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows // _PACK, _PACK, cols)
    packed = sum(v[:, j] << (BITS * j) for j in range(_PACK))
    return _as_int32(packed)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(p >> (BITS * j)) & 0xF for j in range(_PACK)]
    return torch.stack(parts, 1).reshape(-1, packed.shape[1]).int()


def _pack_cols(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Pack ``[rows, cols]`` 4-bit values eight columns to one int32, column ``8c + order[j]`` at bits ``4j``."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // _PACK, _PACK)
    packed = sum(v[:, :, order[j]] << (BITS * j) for j in range(_PACK))
    return _as_int32(packed)


def _unpack_cols(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(packed.shape[0], packed.shape[1], _PACK, dtype=torch.int64)
    for j in range(_PACK):
        out[:, :, order[j]] = (p >> (BITS * j)) & 0xF
    return out.reshape(packed.shape[0], -1).int()


def _as_int32(packed: torch.Tensor) -> torch.Tensor:
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


_IDENTITY = tuple(range(_PACK))


def pack_gptq(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> dict[str, torch.Tensor]:
    """One linear layer in gptqmodel's ``checkpoint_format: gptq`` (v1) tensors."""
    return {
        "qweight": _pack_rows(codes.t()),
        "qzeros": _pack_cols((zeros.t() - 1) & 0xF, _IDENTITY),
        "scales": scales.t().contiguous(),
        "g_idx": (torch.arange(codes.shape[1]) // group_size).to(torch.int32),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]``, zeros ``[out, groups]``, scales ``[out, groups]``) from v1 GPTQ tensors."""
    codes = _unpack_rows(tensors["qweight"]).t()
    zeros = ((_unpack_cols(tensors["qzeros"], _IDENTITY) + 1) & 0xF).t()
    return codes.contiguous(), zeros.contiguous(), tensors["scales"].t().contiguous()


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """One linear layer in AutoAWQ's GEMM tensors."""
    return {
        "qweight": _pack_cols(codes.t(), AWQ_ORDER),
        "qzeros": _pack_cols(zeros.t(), AWQ_ORDER),
        "scales": scales.t().contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]``, zeros ``[out, groups]``, scales ``[out, groups]``) from AWQ GEMM tensors."""
    codes = _unpack_cols(tensors["qweight"], AWQ_ORDER).t()
    zeros = _unpack_cols(tensors["qzeros"], AWQ_ORDER).t()
    return codes.contiguous(), zeros.contiguous(), tensors["scales"].t().contiguous()


def quantization_config(method: str, group_size: int) -> dict[str, Any]:
    """The ``quantization_config`` gptqmodel 7.6.0 writes (its ``meta`` block left out), as publishers ship it."""
    if method == "gptq":
        return {
            "quant_method": "gptq",
            "bits": BITS,
            "group_size": group_size,
            "desc_act": False,
            "sym": True,
            "lm_head": False,
            "format": "gptq",
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
        }
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "format": "gemm",
        "desc_act": False,
        "lm_head": False,
    }


def write_published(base: Path, output: Path, method: str, *, group_size: int = 64) -> tuple[Path, Path]:
    """Write ``base`` (a dense transformers folder) as a ``method`` checkpoint and as its dequantized twin.

    Returns (quantized folder, reference folder). The reference holds the weights every correct reader
    computes from the quantized one, so serving both must give the same answers. Dense tensors are
    bfloat16 and ``dtype`` is ``bfloat16``, as gptqmodel writes them (vLLM runs GPTQ/AWQ in 16 bits only).
    """
    from safetensors.torch import load_file, save_file

    if method not in ("gptq", "awq"):
        raise ValueError(f"unknown method {method!r}")
    state = {}
    for file in sorted(Path(base).glob("*.safetensors")):
        state.update(load_file(str(file)))
    quantized: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in QUANTIZED:
            codes, zeros, scales = quantize_rtn(tensor, group_size, sym=method == "gptq")
            packed = pack_gptq(codes, zeros, scales, group_size) if method == "gptq" else pack_awq(codes, zeros, scales)
            quantized.update({f"{module}.{key}": value for key, value in packed.items()})
            reference[name] = dequantize(codes, zeros, scales, group_size).to(torch.bfloat16)
        else:
            quantized[name] = reference[name] = tensor.to(torch.bfloat16)
    folders = (Path(output) / method, Path(output) / f"{method}-reference")
    for folder, tensors, quant in zip(folders, (quantized, reference), (True, False), strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        for item in Path(base).iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, folder / item.name)
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = "bfloat16"
        if quant:
            config["quantization_config"] = quantization_config(method, group_size)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    return folders
