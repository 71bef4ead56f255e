"""``omniserve deploy --model builtin:NAME``: the built-in models, resolved as the command resolves them.

``builtin:omni-speech`` is the shipped demo thinker plus a seeded random talker and codec, built into the
cache at first use: it must speak through the official client (``/v1/audio/speech`` and chat audio output)
and think exactly as ``builtin:omni`` does, since its thinker tensors are the demo's own.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile

from omniserve.cli import engine_config, prepared_checkpoint
from omniserve.config import DeployOptions
from omniserve.models.demo import demo_model_path
from omniserve.models.demo.speaking import speaking_demo_path
from omniserve.paths import Folders
from tests.conftest import RunningServer, start_server

CLI = [sys.executable, "-m", "omniserve.cli"]
QUESTION = [{"role": "user", "content": "Which digit is larger: 3 or 7?"}]
# one compute thread: on a busy 2-core machine two OpenMP threads wait on each other
ENGINE = {"max_model_len": 2048, "threads": 1}
SERVER = {"speech_max_seconds": 2.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    return Folders(tmp_path_factory.mktemp("cache") / "omniserve")


def _serve(name: str, folders: Folders) -> RunningServer:
    """A server for ``builtin:NAME``, prepared by the functions ``omniserve deploy`` calls."""
    options = DeployOptions(model=Path(f"builtin:{name}"))
    config = engine_config(options, prepared_checkpoint(options, folders))
    return start_server(config.model, name=config.served_model_name, engine=ENGINE, server=SERVER)


@pytest.fixture(scope="module")
def speaking(folders: Folders) -> Iterator[RunningServer]:
    srv = _serve("omni-speech", folders)
    yield srv
    srv.stop()


def _greedy(srv: RunningServer) -> str:
    out = srv.client().chat.completions.create(model=srv.model_name, messages=QUESTION, max_tokens=12, temperature=0)
    return out.choices[0].message.content or ""


def test_the_speaking_demo_speaks(speaking: RunningServer) -> None:
    client = speaking.client()
    assert [m.id for m in client.models.list().data] == ["tiny-omni-speech"]
    wav = client.audio.speech.create(model="tiny-omni-speech", input="Seven is larger.", voice="Ethan")
    samples, rate = soundfile.read(io.BytesIO(wav.content), dtype="float32")
    assert rate == 24_000 and 0.015 <= len(samples) / rate <= SERVER["speech_max_seconds"] + 0.1
    reply = client.chat.completions.create(
        model="tiny-omni-speech",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        modalities=["text", "audio"],
        audio={"voice": "Chelsie", "format": "wav"},
    )
    audio = reply.choices[0].message.audio
    assert audio is not None and audio.transcript
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")
    assert rate == 24_000 and len(samples) > 0


def test_the_speaking_demo_thinks_as_the_demo(speaking: RunningServer, folders: Folders) -> None:
    """Same thinker tensors, same greedy answer (the plain demo's server started after the speaking one's test)."""
    spoken_text = _greedy(speaking)
    plain = _serve("omni", folders)
    try:
        assert plain.model_name == "tiny-omni-demo"
        assert _greedy(plain) == spoken_text and spoken_text
    finally:
        plain.stop()


def test_the_build_is_cached_and_reproducible(speaking: RunningServer, folders: Folders, tmp_path: Path) -> None:
    """A second resolution reuses the cache entry; a build elsewhere writes the same bytes."""
    first = speaking_demo_path(demo_model_path(), folders.models)
    assert [p.name for p in folders.models.iterdir() if not p.name.startswith(".")] == [first.name]
    again = speaking_demo_path(demo_model_path(), tmp_path)
    for item in first.iterdir():
        assert (again / item.name).read_bytes() == item.read_bytes(), item.name


def test_an_unknown_builtin_is_one_line_listing_the_valid_ones(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "200"}
    out = subprocess.run([*CLI, "deploy", "--model", "builtin:nope"], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: unknown built-in model 'builtin:nope'; the built-in models are: builtin:omni, builtin:omni-speech"
    ]
    helped = subprocess.run([*CLI, "deploy", "--help"], capture_output=True, text=True, env=env, check=True)
    assert "builtin:omni-speech" in helped.stdout


def test_eval_and_bench_start_a_builtin_model_by_name() -> None:
    """``eval/bench --model builtin:NAME`` hand the name to the deploy they start (which builds it), not a folder
    named ``builtin:NAME`` under the current directory; an unknown name is the option error, one line."""
    import pydantic
    import pytest

    from omniserve.eval.target import TargetOptions

    started = TargetOptions(model=Path("builtin:omni-speech"))
    assert started.server is not None and str(started.server.model) == "builtin:omni-speech"
    with pytest.raises(pydantic.ValidationError, match="unknown built-in model 'builtin:nope'"):
        TargetOptions(model=Path("builtin:nope"))
