"""Start the EvalScope worker process with its caches inside omniserve's folder and the hubs out of reach.

EvalScope, ModelScope, Hugging Face and NLTK read their cache locations from environment variables
(their interface, not ours): they are set here for the child process only. The hub endpoints are
pointed at a closed loopback port and the Hugging Face libraries are put in offline mode, so a step
that would download something fails at once with a connection error instead of hanging for tens
of seconds or fetching a dataset behind the user's back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.eval.errors import EvalError, MissingExtra

#: Nothing listens on the discard port of loopback: a hub request is refused immediately.
UNREACHABLE_HUB = "http://127.0.0.1:9"
#: The server's API key reaches the worker through its environment, never through the job file on disk.
API_KEY_VARIABLE = "OMNISERVE_EVAL_API_KEY"


def require_eval_extra(*, evalscope: bool = True, charts: bool = False) -> None:
    """Refuse at once, naming the fix, when EvalScope (or matplotlib for charts) is missing.

    Without it the worker would die only after a server was started (and, for the gate, after a
    model was quantized), with an import error in a log file.
    """
    needed = [*(["evalscope"] if evalscope else []), *(["matplotlib"] if charts else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed here: "
            "pip install 'omniserve[eval]'"
        )


def required_cache_dir(cache_dir: Path | None) -> Path:
    """The run's cache folder; the CLI fills in the default (``Folders.eval``), library callers pass one."""
    if cache_dir is None:
        raise EvalError("no eval cache folder was given (cache_dir); the CLI's default is ~/.cache/omniserve/eval")
    return Path(cache_dir).expanduser().resolve()  # EvalScope's children run elsewhere: paths must be absolute


def evalscope_env(cache_dir: Path, *, offline: bool = True) -> dict[str, str]:
    """The worker's environment: the caller's, with every cache and hub variable redirected.

    ``offline=False`` (``eval --allow-download``) keeps the caches inside ``cache_dir`` but lets the
    hubs be reached, at the endpoints the caller's environment names (or the libraries' defaults).
    """
    hub = Path(cache_dir) / "hub"
    env = dict(os.environ)
    env.update(
        HF_HOME=str(hub / "huggingface"),
        HF_DATASETS_CACHE=str(hub / "huggingface" / "datasets"),
        MODELSCOPE_CACHE=str(hub / "modelscope"),
        EVALSCOPE_CACHE=str(hub / "evalscope"),
        NLTK_DATA=str(hub / "nltk_data"),
        PYTHONUNBUFFERED="1",
    )
    if offline:
        env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_ENDPOINT=UNREACHABLE_HUB,
            MODELSCOPE_ENDPOINT=UNREACHABLE_HUB,
        )
    return env


@dataclass
class Worker:
    """A running ``omniserve.eval.evalscope_worker`` child; its output goes to ``log_file``."""

    process: subprocess.Popen[bytes]
    log_file: Path

    @classmethod
    def start(
        cls, job: dict[str, Any], *, folder: Path, cache_dir: Path, api_key: str = "EMPTY", offline: bool = True
    ) -> Worker:
        folder = folder.resolve()  # the child runs in ``folder``: a relative path would not be found from there
        folder.mkdir(parents=True, exist_ok=True)
        job_file = folder / "job.json"
        job_file.write_text(json.dumps(job, indent=2), "utf-8")
        log_file = folder / "evalscope.log"
        with open(log_file, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "omniserve.eval.evalscope_worker", str(job_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**evalscope_env(cache_dir, offline=offline), API_KEY_VARIABLE: api_key},
                cwd=folder,  # EvalScope writes a few relative files (e.g. outputs/) where it runs
                start_new_session=True,
            )
        return cls(process=process, log_file=log_file)

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop at once: what EvalScope already wrote (one line per finished item) stays on disk."""
        if self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=10)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
