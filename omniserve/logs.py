"""What reaches the terminal: omniserve's own lines at ``--log-level``, other libraries' only when they matter.

transformers, llm-compressor, EvalScope and friends log generously (configuration advice, "no
accelerator available!", per-module metrics, progress bars). At the default level a user should
read omniserve's concise lines: third-party loggers are raised to ERROR and transformers' progress
bars are off; ``--log-level debug`` lets everything through. transformers' LOAD REPORT, which does
matter, is captured by ``models.loading`` whatever the verbosity and turned into omniserve's own
error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator

#: Libraries whose standard-library loggers are quieted unless omniserve logs at DEBUG.
THIRD_PARTY_LOGGERS = (
    "transformers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "compressed_tensors",
    "torch",
    "httpx",
    "httpcore",
    "vllm",
    "evalscope",
    "modelscope",
)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Set up logging for one command run at ``level`` (a ``--log-level`` name such as ``info``)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(level=numeric, format=FORMAT)
    logging.getLogger().setLevel(numeric)
    third_party = third_party_level()
    _transformers(third_party)  # first: importing transformers resets its logger to its own default
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(third_party)


def third_party_level() -> int:
    """The level other libraries log at: everything when omniserve logs at DEBUG, else errors only."""
    return logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.ERROR


def quiet_llmcompressor() -> None:
    """Make llm-compressor's console lines follow omniserve's level; call it before any llm-compressor import.

    Its import adds a loguru sink at INFO bound to the ``sys.stdout`` of that moment and logs at
    once (``No accelerator available!`` from a module-level device probe), before any option can
    reach it. So the first import runs with stdout caught (what it wrote goes to the log at DEBUG),
    and the sink is then replaced by one at the third-party level on the real stdout.
    """
    import sys

    if "llmcompressor" not in sys.modules:
        caught = io.StringIO()
        with contextlib.redirect_stdout(caught):
            import llmcompressor  # noqa: F401  (its import configures the logger)
        lines = _final_lines(caught.getvalue())
        if lines:
            _library_log.debug("llm-compressor wrote at import:\n%s", "\n".join(lines))
    from llmcompressor.logger import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level=logging.getLevelName(third_party_level())))


#: A tqdm bar's line ("Compressing model: 100%|####| 14/14 [...]").
_BAR = re.compile(r"\d+%\|")

_library_log = logging.getLogger("omniserve.libraries")


@contextlib.contextmanager
def library_output(what: str) -> Iterator[None]:
    """Keep what a library writes to stderr (llm-compressor's and compressed-tensors' tqdm bars) off the terminal.

    Their bars cannot be switched off by an option, and omniserve draws its own; tqdm and
    ``warnings`` write to ``sys.stderr`` as it is when they write, while omniserve's logging handler
    and loguru's sinks hold the real stream, so redirecting it catches the libraries' text only.
    What was caught goes to the log at DEBUG; if the block fails, its lines other than bars go to
    the log at WARNING before the exception goes on, so no clue is lost. At ``--log-level debug``
    nothing is redirected.
    """
    if third_party_level() <= logging.DEBUG:
        yield
        return
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink):
            yield
    except BaseException:
        lines = [line for line in _final_lines(sink.getvalue()) if not _BAR.search(line)]
        if lines:
            _library_log.warning("%s wrote before failing:\n%s", what, "\n".join(lines))
        raise
    lines = _final_lines(sink.getvalue())
    if lines:
        _library_log.debug("%s wrote:\n%s", what, "\n".join(lines))


def _final_lines(text: str) -> list[str]:
    """Each line as it was left on a terminal: a bar redrawn with ``\\r`` keeps its last state."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines() if line.rsplit("\r", 1)[-1].strip()]


def _transformers(level: int) -> None:
    """transformers' verbosity and progress bars (it keeps its own handler and its own default level)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)
    if level > logging.DEBUG:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()
