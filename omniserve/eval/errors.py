"""What can go wrong when evaluating or benchmarking, as types the CLI reports in one line each.

Like the quantization errors these never travel over HTTP, so they do not derive from the gateway's
``OmniServeError``; the CLI prints ``error: <message>`` and exits with ``exit_code``.
"""

from __future__ import annotations


class EvalError(Exception):
    """Base of every evaluation failure; the message alone must tell the user what to do."""

    exit_code: int = 1


class MissingExtra(EvalError):
    """A package of the ``eval`` extra is not installed; found before any server or worker starts."""

    exit_code = 2


class UnknownSuite(EvalError):
    """A suite name that is neither a built-in suite nor a file."""

    exit_code = 2


class InvalidSuite(EvalError):
    """A suite file that is not valid YAML or does not match the suite schema."""

    exit_code = 2


class DatasetMissing(EvalError):
    """A suite whose data files (or the media they name) are not on disk."""


class EndpointError(EvalError):
    """A ``--url`` that does not answer like an OpenAI-compatible server; the message says what was tried."""


class ServerStartError(EvalError):
    """The omniserve server started for ``--model`` exited or never became healthy."""


class BenchError(EvalError):
    """The load generator could not run or produced no result."""


class GateRefused(EvalError):
    """The quantized model lost more than the allowed points on the gate suite; carries both scores."""

    exit_code = 3  # distinct, so an init step or a script can tell "refused" from "broken"

    def __init__(self, suite: str, original: float, quantized: float, max_drop: float) -> None:
        drop = (original - quantized) * 100
        super().__init__(
            f"quality gate {suite!r} refused the quantized model: {quantized * 100:.1f} vs "
            f"{original * 100:.1f} for the original, a drop of {drop:.1f} points (allowed: {max_drop:g}); "
            "serve the original, choose another method, or pass --force to serve it anyway"
        )
        self.suite = suite
        self.original = original
        self.quantized = quantized
        self.max_drop = max_drop


class GateUnavailable(EvalError):
    """The gate could not produce both scores (a run failed or was incomplete): never treated as a pass."""
