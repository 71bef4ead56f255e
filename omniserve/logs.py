"""What reaches the terminal: omniserve's own lines at ``--log-level``, other libraries' only when they matter.

transformers, llm-compressor, EvalScope and friends log generously (configuration advice, "no
accelerator available!", per-module metrics, progress bars). At the default level a user should
read omniserve's concise lines: third-party loggers are raised to ERROR and transformers' progress
bars are off; ``--log-level debug`` lets everything through. transformers' LOAD REPORT, which does
matter, is captured by ``models.loading`` whatever the verbosity and turned into omniserve's own
error.
"""

from __future__ import annotations

import logging

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
    """llm-compressor logs through loguru to stdout at INFO on import: route it to the third-party level."""
    from llmcompressor.logger import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level=logging.getLevelName(third_party_level())))


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
