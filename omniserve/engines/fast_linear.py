"""oneDNN linear layers with prepacked weights for the transformers engine on CPU (``--linear-kernel``).

Decoding is matrix multiplication: in bfloat16 on this project's reference CPU (AVX-512 BF16, no AMX)
a decode step of a 12-layer Qwen2-shaped model spends ~87% of its time in ``aten::mm``/``addmm``. Plain
``torch.nn.functional.linear`` hands oneDNN the weight in its ordinary row-major layout, so oneDNN
reorders it into its blocked layout on *every* call; reordering once at load (what vLLM's CPU backend
and inductor's ``freezing`` do) and calling ``torch.ops.mkldnn._linear_pointwise`` on the packed
weight removes that work. Measured on the 4 linear shapes of one such layer (896->896, 896->128,
896->4864, 4864->896; 2 loaded cores, best of 8 interleaved rounds), bfloat16:

    rows   torch      oneDNN packed
      1    5.4 ms     2.0 ms
      4   10.6 ms     2.0 ms
     16   22.7 ms     5.9 ms
    256   26.3 ms    18.6 ms  (one 896->4864 layer)

with bit-identical outputs (the same oneDNN kernel, only the reorder differs). A whole decode step of
the medium checkpoint (``benchmarks/linear_kernels.py``, CPU time, one thread) gains 1.3x / 1.5x / 1.35x
at 1 / 4 / 16 rows in bfloat16. In float32 torch's own path (MKL sgemm) is faster at 1 row (oneDNN
0.76x a step) and slower at 4-16 (oneDNN 1.3x), and switching kernel with the row count would make a
sequence's float32 output depend on its batch, so ``auto`` packs bfloat16 only; ``onednn`` forces it
for float32 too (the test of greedy equality runs that way).

Only modules whose type is exactly ``torch.nn.Linear`` are switched, by changing their class to
``PackedLinear`` (a subclass: PEFT's LoRA layers still wrap them, quantized layers are left alone);
the ordinary ``weight`` stays, so tied weights, LoRA and state dicts see what they always saw. The
cost is memory: a second copy of every packed layer's weight. A weight replaced or written in place
(through the parameter) is repacked at the next call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from omniserve.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LinearKernel = Literal["auto", "torch", "onednn"]


class LinearKernelError(ModelLoadError):
    """``--linear-kernel onednn`` asked where oneDNN cannot run it (a GPU, float16, no bf16 support).

    A ``ModelLoadError``: the server refuses to start with this message, never serves half-configured."""


def choose_kernel(kernel: LinearKernel, dtype: torch.dtype, device: torch.device) -> Literal["torch", "onednn"]:
    """What ``kernel`` means for this dtype and device; an explicit ``onednn`` that cannot run is an error."""
    import torch

    if kernel == "torch":
        return "torch"
    supported = (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    )
    if kernel == "onednn":
        if not supported:
            raise LinearKernelError(
                f"--linear-kernel onednn needs the CPU device with float32, or bfloat16 on a processor with "
                f"native bf16 support; got device {device.type}, dtype {str(dtype).removeprefix('torch.')}"
            )
        return "onednn"
    return "onednn" if supported and dtype == torch.bfloat16 else "torch"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _build_packed_linear() -> type:
    import torch

    class PackedLinear(torch.nn.Linear):
        """``nn.Linear`` computed by oneDNN on a weight reordered once (see the module docstring)."""

        _packed: torch.Tensor
        _packed_key: tuple[int, int]

        def repack(self) -> None:
            self._packed = _pack(self.weight)
            self._packed_key = (self.weight.data_ptr(), self.weight._version)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._packed_key != (self.weight.data_ptr(), self.weight._version):
                self.repack()  # the weight was replaced or written through the parameter
            if x.dtype != self.weight.dtype or x.device.type != "cpu":
                return torch.nn.functional.linear(x, self.weight, self.bias)  # the error/handling torch gives
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    return PackedLinear


_PACKED_LINEAR: type | None = None


def packed_linear_class() -> type:
    """The ``PackedLinear`` class (built on first use so that importing this module needs no torch)."""
    global _PACKED_LINEAR
    if _PACKED_LINEAR is None:
        _PACKED_LINEAR = _build_packed_linear()
    return _PACKED_LINEAR


def apply_linear_kernel(model: Any, kernel: LinearKernel, dtype: torch.dtype, device: torch.device) -> str:
    """Switch ``model``'s plain ``nn.Linear`` layers of ``dtype`` to packed oneDNN ones if ``kernel`` says so.

    Returns the kernel in use ("torch" or "onednn"); logs how many layers were packed and how long it took
    (it runs at load, before the warm-up, so readiness waits for it)."""
    import time

    import torch

    chosen = choose_kernel(kernel, dtype, device)
    if chosen == "torch":
        return chosen
    cls = packed_linear_class()
    started, count = time.perf_counter(), 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == dtype and module.weight.device.type == "cpu":
            module.__class__ = cls
            module.repack()
            count += 1
    log.info("linear kernel: oneDNN, %d layers packed in %.2f s", count, time.perf_counter() - started)
    return chosen
