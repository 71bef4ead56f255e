"""Shared fixtures: tiny checkpoints built locally and real uvicorn servers on loopback."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Tests must never reach a model hub; every checkpoint here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: Examples per fuzzed operation / strategy in CI: small enough for the fuzz tests to stay near a minute on
#: two cores (25 took ~110 s once the Responses API joined the schema); ``--fuzz-examples`` raises it for a
#: longer hunt (docs/testing.md).
DEFAULT_FUZZ_EXAMPLES = 15
#: One fixed seed, so a CI failure replays exactly; ``--fuzz-seed`` explores elsewhere.
DEFAULT_FUZZ_SEED = 20261128
#: Measured traffic in tests/test_soak.py after its warm-up: under a minute in CI (some 3,000 requests, enough
#: for a per-request leak to show); ``--soak-seconds`` soaks longer (480 s was measured, docs/testing.md).
DEFAULT_SOAK_SECONDS = 50.0


def pytest_addoption(parser: pytest.Parser) -> None:
    """Fuzzing and soak budgets as pytest options, not environment variables: the command line says what ran."""
    group = parser.getgroup("omniserve fuzzing and soak")
    group.addoption(
        "--fuzz-examples",
        type=int,
        default=DEFAULT_FUZZ_EXAMPLES,
        help=f"examples per operation / strategy in tests/test_fuzz.py (default {DEFAULT_FUZZ_EXAMPLES})",
    )
    group.addoption(
        "--fuzz-seed",
        type=int,
        default=DEFAULT_FUZZ_SEED,
        help=f"seed of tests/test_fuzz.py's generators (default {DEFAULT_FUZZ_SEED}: CI replays the same cases)",
    )
    group.addoption(
        "--soak-seconds",
        type=float,
        default=DEFAULT_SOAK_SECONDS,
        help=f"measured traffic in tests/test_soak.py, after its warm-up (default {DEFAULT_SOAK_SECONDS:g})",
    )


@pytest.fixture(scope="session")
def fuzz_examples(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--fuzz-examples"))


@pytest.fixture(scope="session")
def fuzz_seed(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--fuzz-seed"))


@pytest.fixture(scope="session")
def soak_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--soak-seconds"))


class FamilyModels:
    """``models(name)``: the family's tiny checkpoint with its published chat template, built once per session
    (``seconds[name]``: how long its build took)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.built:
            from omniserve.models.families import get
            from tests.test_train_support import published_template

            family = get(name)
            assert family.template is not None
            started = time.perf_counter()
            self.built[name] = family.build(self.root / name, published_template(family.template))
            self.seconds[name] = round(time.perf_counter() - started, 2)
        return self.built[name]


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    return FamilyModels(tmp_path_factory.mktemp("families"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    server: Any
    thread: threading.Thread
    engine: Any
    app: Any
    model_name: str

    def client(self, api_key: str = "none", **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def idle(srv: RunningServer) -> bool:
    """No sequence admitted: every place of the engine's bounded queue given back."""
    stats = srv.engine.stats()
    return stats.waiting == 0 and stats.running == 0


def start_server(
    model: Path,
    *,
    name: str = "tiny",
    engine: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    engine_name: str = "transformers",
    start_timeout: float = 120,
) -> RunningServer:
    import uvicorn

    from omniserve.config import EngineConfig, ServerConfig
    from omniserve.engines.registry import create_engine
    from omniserve.server.app import build_app

    engine_config = EngineConfig(model=model, served_model_name=name, **(engine or {}))
    # The listening socket is bound here and handed to uvicorn, which would bind only after the app's startup:
    # an engine started there (vLLM's ZMQ sockets) could take a port picked earlier and free in between.
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    server_config = ServerConfig(host="127.0.0.1", port=port, **(server or {}))
    eng = create_engine(engine_name, engine_config)
    app = build_app(eng, engine_config, server_config)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", uv, thread, eng, app, name)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_omni(models_dir: Path) -> Path:
    from omniserve.models import build_tiny_omni

    return build_tiny_omni(models_dir / "tiny-omni")


@pytest.fixture(scope="session")
def speaking_model(models_dir: Path) -> Path:
    """The tiny Omni with its talker and codec (speech output): tests/test_speech.py, tests/test_chat_audio.py."""
    from omniserve.models.tiny import build_tiny_omni_speaking

    return build_tiny_omni_speaking(models_dir / "tiny-omni-speaking")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(models_dir: Path) -> Path:
    from omniserve.models import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(models_dir / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen2(models_dir: Path) -> Path:
    from omniserve.models import build_tiny_qwen2

    return build_tiny_qwen2(models_dir / "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_qwen2: Path, models_dir: Path) -> Path:
    """The tiny text model with the chat template Qwen publishes for Qwen3 (tools, <think> blocks)."""
    from tests.test_train_support import published_template, with_chat_template

    return with_chat_template(tiny_qwen2, models_dir / "tiny-qwen3", published_template("qwen3"))


@pytest.fixture(scope="session")
def omni_server(tiny_omni: Path) -> Iterator[RunningServer]:
    """The default server most tests talk to: tiny omni, no auth, loopback media allowed."""
    from omniserve.config import MediaLimits

    srv = start_server(
        tiny_omni,
        name="tiny-omni",
        engine={"max_concurrency": 8, "max_queue": 32, "max_model_len": 2048},
        server={"media": MediaLimits(allow_private_media_addresses=True, max_video_seconds=20, max_audio_seconds=20)},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(omni_server: RunningServer) -> Any:
    return omni_server.client()
