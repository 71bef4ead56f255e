"""What can go wrong when quantizing, as types the CLI (and ``deploy --quant``) report in one line each.

These never travel over HTTP, so they do not derive from the gateway's ``OmniServeError``; the CLI turns
any ``QuantizeError`` into ``error: <message>`` and exit code 1 (2 for bad options).
"""

from __future__ import annotations

from pathlib import Path


class QuantizeError(Exception):
    """Base of every quantization failure; the message alone must tell the user what to do."""

    exit_code: int = 1


class InvalidQuantizeOption(QuantizeError):
    """An option that cannot work: unknown method or scheme, a bad number, a clash between flags."""

    exit_code = 2


class RecipeError(QuantizeError):
    """A recipe file that is missing, unreadable or does not describe a valid llm-compressor modifier."""


class NotACheckpoint(QuantizeError):
    """The model folder has no ``config.json`` or no weights."""


class AlreadyQuantized(QuantizeError):
    """Quantizing an already quantized checkpoint would stack two lossy steps; refused, never guessed at."""

    def __init__(self, path: Path, quant_method: str) -> None:
        super().__init__(
            f"{path} is already quantized (config.json quantization_config.quant_method={quant_method!r}); "
            "quantize the full-precision checkpoint instead, or serve this one as it is"
        )
        self.quant_method = quant_method


class CalibrationDataError(QuantizeError):
    """Calibration data that is empty, not JSON, not OpenAI-style messages, or whose media do not decode.

    ``source`` and ``line`` name the place (1-based line of a JSONL file) so the user can fix it.
    """

    def __init__(self, message: str, *, source: Path | str | None = None, line: int | None = None) -> None:
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(where + message)
        self.source = source
        self.line = line


class SchemeUnsupported(QuantizeError):
    """A scheme whose quantized weights cannot be run on this machine (the probe says which step failed)."""


class NotEnoughDisk(QuantizeError):
    """Too little free space where the output is written; checked before the long part starts."""


class OutputExists(QuantizeError):
    """The output folder exists and ``--overwrite`` was not given: a user's folder is never replaced silently."""


class QuantizationFailed(QuantizeError):
    """llm-compressor failed, or did something that would give a silently wrong checkpoint."""


class VerificationFailed(QuantizeError):
    """The saved checkpoint does not reload cleanly or changed weights it must keep; it is not published."""
