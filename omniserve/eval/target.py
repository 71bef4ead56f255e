"""The server being scored: one we start (``--model``, like ``swift eval``) or one already running (``--url``).

Either way the rest of the package sees a ``Target``: an OpenAI base URL, the model id to ask
for, and ``problem()``, which says whether the server is still there. A started server is a real
``omniserve deploy`` process on a free loopback port, so evaluation exercises exactly what users
deploy; it is stopped with Ctrl-C's signal when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from omniserve.atomic_files import write_text_atomic
from omniserve.config import DeployOptions, QuantMethod, ServerConfig
from omniserve.errors import ModelLoadError
from omniserve.eval.errors import EndpointError, ServerStartError
from omniserve.flags import OptionError, parse_argv
from omniserve.models.demo import builtin_name, builtin_served_name


@dataclass
class Target:
    """An OpenAI-compatible endpoint plus what the report should say about it."""

    base_url: str  # ends with /v1
    model: str
    api_key: str
    identity: dict[str, Any]
    server: ManagedServer | None = None
    _failures: int = field(default=0, repr=False)

    def problem(self) -> str | None:
        """Why the server can no longer answer, or None. Cheap enough to call every second or two."""
        if self.server is not None:
            return self.server.problem()
        try:
            response = httpx.get(f"{self.base_url}/models", headers=_auth(self.api_key), timeout=5)
            ok = response.status_code < 500
        except httpx.HTTPError:
            ok = False
        self._failures = 0 if ok else self._failures + 1
        # two misses in a row: one slow answer under load is not a dead server
        return f"{self.base_url} stopped answering GET /models" if self._failures >= 2 else None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


#: What a run's recorded options must never contain (``model_dump(exclude=SECRETS)``).
SECRETS: dict[str, object] = {"api_key": True, "server": {"server": {"api_keys"}}}


class TargetOptions(BaseModel):
    """Which server a run talks to: one it starts (``--model``) or one already running (``--url``).

    Shared by ``omniserve eval`` and ``omniserve bench`` (and the quality gate), so both accept the
    same ways to name a server and start it the same way. A started server is ``server``, an
    ``omniserve deploy`` configuration: the flags below build it (``--deploy-arg`` read by the deploy
    command's own parser), or the quality gate gives it directly.
    """

    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(None, description="Checkpoint to serve on a free loopback port for the run.")
    url: str | None = Field(None, description="Score an already running OpenAI-compatible server (…/v1).")
    api_key: str | None = Field(None, description="Key for --url servers that need one.")
    served_model_name: str | None = Field(
        None, description="With --url: the model id to ask for (default: the first listed)."
    )
    engine: str = Field("transformers", description="With --model: inference engine.")
    quant: QuantMethod | None = Field(None, description="With --model: quantize first, as deploy --quant does.")
    quant_cache_dir: Path | None = Field(None, description="With --quant: its cache folder.")
    lora: dict[str, Path] = Field(
        default_factory=dict,
        description="With --model: serve this LoRA adapter (NAME=PATH) beside the base and score it, not the base.",
    )
    deploy_args: list[str] = Field(
        default_factory=list,
        description="With --model: extra `omniserve deploy` flag, e.g. --deploy-arg=--dtype=bfloat16.",
        json_schema_extra={"flag": "deploy-arg"},
    )
    server: DeployOptions | None = Field(
        None,
        description="The server to start, as deploy options (instead of --model).",
        json_schema_extra={"cli": False},
    )
    startup_timeout: float = Field(
        600, gt=0, description="Seconds a started server may take to become healthy.", json_schema_extra={"cli": False}
    )

    @model_validator(mode="after")
    def _one_target(self) -> TargetOptions:
        started = self.model is not None or self.server is not None
        if started == (self.url is not None) or (self.model is not None and self.server is not None):
            raise ValueError("give exactly one of --model (start a server) or --url (a running one)")
        if self.url is not None and (self.quant or self.deploy_args or self.lora):
            raise ValueError("--quant, --lora and --deploy-arg apply to --model only")
        if len(self.lora) > 1:
            raise ValueError("--lora scores one adapter per run: give it once")
        if self.model is not None:
            self.server = self._server_from_flags(self.model)
        return self

    def _server_from_flags(self, model: Path) -> DeployOptions:
        """``omniserve deploy`` options: ``--deploy-arg`` parsed by deploy's own parser, then these flags."""
        try:
            deploy = parse_argv(DeployOptions, self.deploy_args, what="--deploy-arg")
        except OptionError as exc:
            raise ValueError(str(exc)) from None
        # a built-in model (builtin:NAME) is resolved by the deploy it starts, a folder here
        try:
            folder = model if builtin_name(model) is not None else Path(model).resolve()
        except ModelLoadError as exc:  # builtin:NAME with an unknown NAME: the one-line option error
            raise ValueError(str(exc)) from None
        update = {"model": folder, "engine": self.engine, "quant": self.quant}
        if self.quant_cache_dir is not None:
            update["quant_cache_dir"] = self.quant_cache_dir
        data = {**deploy.model_dump(), **update}
        if self.lora:  # the adapter rides on the started server; the run asks for it by name (connect)
            data["server"] = {**data["server"], "lora": {**data["server"]["lora"], **self.lora}}
        return DeployOptions.model_validate(data)


def evaluation_server(deploy: DeployOptions, model: Path) -> DeployOptions:
    """The server an evaluation of ``model`` runs on: ``deploy``'s engine, engine options and media limits only.

    What only matters to the deployed server (address, keys, the quantization and gate steps) is left
    out: the evaluation scores a checkpoint as that server would answer, on a private loopback port.
    """
    return DeployOptions(
        model=Path(model).resolve(),
        engine=deploy.engine,
        engine_options=deploy.engine_options,
        # a private server stopped by the run itself: no load balancer to warn, so no drain delay
        server=ServerConfig(media=deploy.server.media, drain_delay_seconds=0),
        log_level=deploy.log_level,
    )


def connect(options: TargetOptions, *, log_file: Path) -> Target:
    """The running server ``options`` name, or a fresh ``omniserve deploy`` logging to ``log_file``."""
    if options.url is not None:
        return connect_url(options.url, api_key=options.api_key, model=options.served_model_name)
    assert options.server is not None  # the validator built it
    target = start_model(options.server, log_file=log_file, startup_timeout=options.startup_timeout)
    for name in options.lora:  # --lora: the adapter is what is scored (the deploy options in identity name it)
        target.model = target.identity["model"] = name
    return target


def connect_url(url: str, *, api_key: str | None = None, model: str | None = None, timeout: float = 10) -> Target:
    """A running server, checked first: it must answer ``GET .../v1/models`` with an OpenAI model list."""
    tried: list[str] = []
    problems: list[str] = []
    key = api_key or "EMPTY"
    for base in _candidate_bases(url):
        tried.append(f"GET {base}/models")
        try:
            response = httpx.get(f"{base}/models", headers=_auth(key), timeout=timeout)
        except httpx.HTTPError as exc:
            problems.append(f"{base}/models: {type(exc).__name__}: {exc or 'no answer'}")
            continue
        if response.status_code in (401, 403):
            raise EndpointError(
                f"{base}/models answered {response.status_code} (authentication): pass the server's key with --api-key"
            )
        ids = _model_ids(response)
        if ids is None:
            problems.append(f"{base}/models answered {response.status_code} without an OpenAI model list")
            continue
        if not ids:
            problems.append(f"{base}/models lists no models")
            continue
        if model is not None and model not in ids:
            raise EndpointError(f"{base} does not serve model {model!r}; it lists {', '.join(ids)}")
        chosen = model or ids[0]
        return Target(base_url=base, model=chosen, api_key=key, identity={"mode": "url", "url": base, "model": chosen})
    raise EndpointError(
        f"{url} is not a reachable OpenAI-compatible server (tried {'; '.join(tried)}): {'; '.join(problems)}"
    )


def start_model(deploy: DeployOptions, *, log_file: Path, startup_timeout: float = 600) -> Target:
    """``omniserve deploy`` with ``deploy``'s options on a free loopback port, returned once ``/health`` answers 200."""
    if deploy.model is None:
        raise ServerStartError("a server started for a run needs a checkpoint folder (model)")
    builtin = builtin_name(deploy.model)
    name = deploy.served_model_name or (builtin_served_name(builtin) if builtin else deploy.model.name)
    server = ManagedServer.start(deploy.model_copy(update={"served_model_name": name}), log_file=log_file)
    try:
        server.wait_healthy(startup_timeout)
    except BaseException:
        server.stop()
        raise
    identity = {
        "mode": "model",
        "model_path": str(deploy.model),
        "model": name,
        "engine": deploy.engine,
        "quant": deploy.quant,
        "deploy": deploy.model_dump(mode="json", exclude_defaults=True, exclude={"model", "served_model_name"}),
        "url": server.base_url,
    }
    return Target(base_url=server.base_url, model=name, api_key="EMPTY", identity=identity, server=server)


@dataclass
class ManagedServer:
    process: subprocess.Popen[bytes]
    port: int
    log_file: Path
    command: list[str]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def start(cls, deploy: DeployOptions, *, log_file: Path) -> ManagedServer:
        """``omniserve deploy --config FILE`` where FILE holds ``deploy`` bound to a free loopback port."""
        port = free_port()
        bound = deploy.model_copy(
            update={"server": deploy.server.model_copy(update={"host": "127.0.0.1", "port": port})}
        )
        config = log_file.with_name(f"{log_file.stem}-deploy.json")
        write_text_atomic(config, json.dumps(bound.model_dump(mode="json", exclude_defaults=True), indent=2) + "\n")
        command = [sys.executable, "-m", "omniserve.cli", "deploy", "--config", str(config)]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(process=process, port=port, log_file=log_file, command=command)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"omniserve deploy exited with code {code} before it was ready:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"omniserve deploy was not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def problem(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"the omniserve server exited with code {code} (log: {self.log_file})"

    def stop(self, timeout: float = 20) -> None:
        """Ctrl-C (graceful drain), then SIGKILL if it does not stop in ``timeout`` seconds."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_file.read_text("utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A port the OS reports free on loopback now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _candidate_bases(url: str) -> list[str]:
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/models"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return [base] if base.endswith("/v1") else [f"{base}/v1", base]


def _model_ids(response: httpx.Response) -> list[str] | None:
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        return None
    return [m["id"] for m in data]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
