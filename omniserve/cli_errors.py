"""How every command reports an expected failure: one ``error: <message>`` line and a meaningful exit code.

The quantization and evaluation errors carry their own ``exit_code`` (2 for a usage mistake, 3 for a
refused quality gate, 1 otherwise), so scripts and Kubernetes init steps can tell them apart; a
traceback would only bury the message that says what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer


@contextlib.contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn ``errors`` raised inside the block into ``error: <message>`` on stderr and their ``exit_code``."""
    try:
        yield
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
