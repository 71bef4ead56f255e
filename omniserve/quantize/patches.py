"""The one workaround omniserve applies to llm-compressor, scoped to the AWQ run that needs it.

llm-compressor 0.14.0.1's AWQ smoothing calls ``IntermediatesCache.pin_memory`` on its cached
activations before every grid search, unconditionally. Pinning (page-locking) CPU memory is only
meaningful, and only possible, with an accelerator: on a machine without one, torch raises
("Found no NVIDIA driver on your system" with the CUDA build of torch, "Cannot access accelerator
device" with others) and AWQ cannot run at all. The library has no option to skip it (AWQ's
``offload_device`` only chooses where the cache lives; the cache's tensors are pinned wherever they are CPU
tensors), hence this patch:

- active only while an AWQ recipe runs (a context manager, restored on exit even on error);
- active only when ``torch.accelerator.is_available()`` is false: with a GPU the library runs as shipped;
- it makes ``pin_memory`` a no-op, which changes nothing else: pinning only speeds up later host-to-device
  copies, and without a device there are none.

``tests/test_quantize_patches.py`` fails when the library no longer raises without an accelerator
(then delete this module) or when ``pin_memory``'s name or signature changes (then revisit it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def pinning_unavailable() -> bool:
    """True when page-locked memory cannot be allocated: no accelerator is present."""
    import torch

    return not torch.accelerator.is_available()


@contextlib.contextmanager
def awq_without_accelerator(active: bool = True) -> Iterator[bool]:
    """Within the block, llm-compressor's activation cache skips pinning when there is no accelerator.

    Yields whether the patch is in effect.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not (active and pinning_unavailable()):
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]

    def pin_memory(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        """No accelerator, nothing to transfer to: leave the cached tensors as they are."""

    IntermediatesCache.pin_memory = pin_memory  # type: ignore[method-assign]
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]
