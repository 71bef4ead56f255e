"""Optional extras: a command whose extra is not installed is refused in one line, before it does any work.

Quantization, training and evaluation live in pip extras (pyproject.toml) because their pins cannot all
share one environment: llm-compressor and vLLM pin different compressed-tensors. Without a check, a
missing extra surfaces as a ``ModuleNotFoundError`` traceback minutes into a run, after a model was
loaded or a server started. With it the user reads which extra to install, and exit code 2 (a usage
problem, like a bad flag) lets a script or a Kubernetes init step tell it from a run that failed.

The modules are looked up, never imported: llm-compressor alone takes seconds to import.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from omniserve.errors import ModelLoadError

#: The modules each command needs from its extra (the import names; pyproject.toml names the distributions).
QUANTIZE_MODULES = ("llmcompressor", "compressed_tensors")
TRAIN_MODULES = ("accelerate",)
LORA_MODULES = ("peft",)
#: Loading a compressed-tensors checkpoint with transformers needs only compressed-tensors, which the
#: quantize extra brings (vLLM environments have their own pinned copy).
COMPRESSED_TENSORS_MODULES = ("compressed_tensors",)


class MissingExtra(ModelLoadError):
    """A module of an optional extra is not installed here; raised before any model is loaded.

    A ``ModelLoadError`` on purpose: every command already reports that type in one line (``deploy``'s
    ``exit_on``, the server's start-up report, ``train``), so a missing extra reads the same everywhere
    and needs no new handler. ``exit_code`` 2 sets it apart from a checkpoint that is broken.
    """

    exit_code = 2

    def __init__(self, extra: str, missing: Iterable[str], purpose: str | None = None) -> None:
        self.extra = extra
        self.missing = tuple(missing)
        super().__init__(missing_extra_message(extra, self.missing, purpose))


def missing_extra_message(extra: str, missing: Iterable[str], purpose: str | None = None) -> str:
    """``llmcompressor and compressed_tensors are not installed here: pip install 'omniserve[quantize]'``.

    The wording of ``omniserve eval``'s refusal, so every command names the fix the same way; ``purpose``
    says what needed them when the command alone does not make it obvious (serving a quantized checkpoint).
    """
    names = list(missing)
    verb = "is" if len(names) == 1 else "are"
    why = f" ({purpose})" if purpose else ""
    return f"{' and '.join(names)} {verb} not installed here{why}: pip install 'omniserve[{extra}]'"


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here, in order."""
    return [name for name in modules if not _importable(name)]


def require_extra(extra: str, modules: Iterable[str], *, purpose: str | None = None) -> None:
    """Raise ``MissingExtra`` naming ``pip install 'omniserve[<extra>]'`` when any of ``modules`` is missing."""
    missing = missing_modules(modules)
    if missing:
        raise MissingExtra(extra, missing, purpose)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or a module without a spec
        return False
