"""The one workaround for llm-compressor (AWQ pins memory without an accelerator): needed, scoped, removable.

If ``test_library_still_pins_without_an_accelerator`` fails, llm-compressor fixed the bug: delete
``omniserve/quantize/patches.py`` and its use in ``run.py``. If the signature test fails, the
patched method changed and the patch must be revisited before it silently stops applying.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from omniserve.quantize.patches import awq_without_accelerator, pinning_unavailable

no_accelerator = pytest.mark.skipif(not pinning_unavailable(), reason="this machine has an accelerator")


def _cache_with_a_cpu_tensor() -> object:
    from llmcompressor.pipelines.cache import IntermediatesCache

    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"hidden_states": torch.ones(2, 3)})
    return cache


def test_patched_method_is_still_there_with_the_same_signature() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    assert list(inspect.signature(IntermediatesCache.pin_memory).parameters) == ["self", "batch_index", "input_names"]
    source = inspect.getsource(IntermediatesCache._pin_intermediate)
    assert "pin_memory()" in source  # what fails without an accelerator


@no_accelerator
def test_library_still_pins_without_an_accelerator() -> None:
    cache = _cache_with_a_cpu_tensor()
    with pytest.raises(RuntimeError):
        cache.pin_memory(0)


@no_accelerator
def test_patch_is_active_only_inside_the_block() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    with awq_without_accelerator() as active:
        assert active
        cache = _cache_with_a_cpu_tensor()
        cache.pin_memory(0)  # no error
        assert cache.fetch(0)["hidden_states"].sum() == 6  # values untouched
    assert IntermediatesCache.pin_memory is original
    with awq_without_accelerator(active=False) as active:
        assert not active
        assert IntermediatesCache.pin_memory is original


@no_accelerator
def test_patch_is_restored_after_an_error() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    with pytest.raises(ZeroDivisionError), awq_without_accelerator():
        1 / 0  # noqa: B018
    assert IntermediatesCache.pin_memory is original
