"""`omniserve deploy` as users run it: a real process serving the built-in demo omni model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port

CLI = [sys.executable, "-m", "omniserve.cli"]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache)}


def test_help_is_fast_and_lists_limits() -> None:
    start = time.perf_counter()
    out = subprocess.run(
        [*CLI, "deploy", "--help"], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert time.perf_counter() - start < 5  # no torch import for --help
    for flag in ("--max-queue", "--max-video-frames", "--allowed-local-media-path", "--api-key-file"):
        assert flag in out.stdout


def test_deploy_builtin_model_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("# team keys\nkey-one\n")
    proc = subprocess.Popen(
        [*CLI, "deploy", "--port", str(port), "--api-key-file", str(keyfile)],
        env=_env(tmp_path / "cache"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key-one", max_retries=0)
        [model] = client.models.list().data
        out = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
        assert model.id == "tiny-omni-demo"  # the shipped, trained demo model is the default
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode in (0, 130)  # a graceful stop on Ctrl-C (uvicorn re-raises the signal)
    output = proc.stdout.read() if proc.stdout else ""
    assert "Finished server process" in output
    # a clean first start: omniserve's own lines, not transformers' advice about the demo's talker config
    assert "[transformers]" not in output and "Model config:" not in output, output


def test_deploy_refuses_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "deploy", "--model", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "not a checkpoint folder" in out.stderr


def test_deploy_does_not_move_to_another_port_when_busy(tmp_path: Path, tiny_qwen2: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [*CLI, "deploy", "--model", str(tiny_qwen2), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert out.returncode != 0
    assert "address already in use" in (out.stdout + out.stderr).lower()


def test_print_k8s_renders_values_without_secrets_or_a_model_build(tmp_path: Path) -> None:
    import yaml

    out = subprocess.run(
        [*CLI, "deploy", "--print-k8s", "--max-queue", "5", "--api-key", "very-secret"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path / "cache"),
    )
    assert out.returncode == 0, out.stderr
    values = yaml.safe_load(out.stdout)
    assert values["engine"]["maxQueue"] == 5
    assert "very-secret" not in out.stdout
    assert not (tmp_path / "cache").exists()  # describing the command built nothing


def test_deploy_quant_fills_the_cache_once(tmp_path: Path, tiny_qwen2: Path) -> None:
    """`deploy --quant` quantizes on first use and reuses the cached result the next time."""
    cache = tmp_path / "quant-cache"
    cmd = [
        *CLI,
        "deploy",
        "--model",
        str(tiny_qwen2),
        "--quant",
        "fp8",
        "--quant-cache-dir",
        str(cache),
        "--quantize-only",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip().splitlines()[-1])
    assert folder.is_dir() and folder.parent == cache
    config = (folder / "config.json").read_text()
    assert "compressed-tensors" in config
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip().splitlines()[-1]) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamp  # nothing rewritten
    refused = subprocess.run(
        [
            *CLI,
            "deploy",
            "--model",
            str(tiny_qwen2),
            "--quant",
            "int3",
            "--quant-cache-dir",
            str(cache),
            "--quantize-only",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "int3" in refused.stderr


def test_a_checkpoint_missing_weights_is_refused_in_one_message_with_exit_1(tmp_path: Path, tiny_qwen2: Path) -> None:
    """transformers would fill the gap with random weights; deploy refuses, names them, and exits 1 (not 3)."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2, broken)
    weights = load_file(broken / "model.safetensors")
    removed = "model.layers.0.mlp.down_proj.weight"
    del weights[removed]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = subprocess.run(
        [*CLI, "deploy", "--model", str(broken), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"{broken} lacks weights the model needs ({removed})" in out.stderr
    assert "Traceback" not in out.stderr, "the message alone, not a traceback around it"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no API key"),
        ("# team keys, to be filled in\n\n   \n", "holds no API key"),
        (None, "cannot read it"),
    ],
)
def test_an_api_key_file_without_keys_refuses_to_start(tmp_path: Path, content: str | None, message: str) -> None:
    """An empty Secret must not turn authentication off: deploy exits 2 before loading anything."""
    keyfile = tmp_path / "keys.txt"
    if content is not None:
        keyfile.write_text(content)
    out = subprocess.run(
        [*CLI, "deploy", "--port", str(free_port()), "--api-key-file", str(keyfile)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path / "cache"),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"error: --api-key-file {keyfile}" in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr
