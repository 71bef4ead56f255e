"""A command whose pip extra is missing is refused in one line that names the extra, before any work starts.

The packages are really absent: each command runs as ``python -S -m omniserve.cli`` over a site folder
holding every installed distribution but the ones left out (symlinks), so nothing can import them, as
in an environment installed with a plain ``pip install -e .`` (no extras).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from omniserve.errors import ModelLoadError
from omniserve.extras import MissingExtra, missing_extra_message, missing_modules, require_extra
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
QUANTIZE_MESSAGE = (
    "error: llmcompressor and compressed_tensors are not installed here: pip install 'omniserve[quantize]'"
)


# --- the function ------------------------------------------------------------------------------------------


def test_message_names_the_missing_modules_and_the_extra() -> None:
    assert missing_extra_message("train", ["accelerate"]) == (
        "accelerate is not installed here: pip install 'omniserve[train]'"
    )
    assert missing_extra_message("quantize", ["llmcompressor", "compressed_tensors"], "needed for x") == (
        "llmcompressor and compressed_tensors are not installed here (needed for x): pip install 'omniserve[quantize]'"
    )


def test_present_modules_pass_and_missing_ones_are_listed_in_order() -> None:
    require_extra("base", ["json", "typer"])
    assert missing_modules(["json", "omniserve_no_such_module", "no_such_parent.child"]) == [
        "omniserve_no_such_module",
        "no_such_parent.child",
    ]
    with pytest.raises(MissingExtra) as refused:
        require_extra("quantize", ["json", "omniserve_no_such_module"])
    assert refused.value.exit_code == 2 and refused.value.missing == ("omniserve_no_such_module",)
    assert str(refused.value) == "omniserve_no_such_module is not installed here: pip install 'omniserve[quantize]'"


def test_a_missing_extra_is_reported_wherever_a_load_failure_is() -> None:
    """deploy's exit_on, the server's start-up report and train all report ModelLoadError in one line."""
    assert issubclass(MissingExtra, ModelLoadError)


# --- the commands, in a site folder that really lacks the packages ------------------------------------------


@dataclass(frozen=True)
class Site:
    """A Python path without some distributions, and the environment that runs omniserve on it."""

    folder: Path
    home: Path

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {
            "PYTHONPATH": f"{ROOT}{os.pathsep}{self.folder}",
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "HF_HUB_OFFLINE": "1",
        }
        cli = [sys.executable, "-S", "-m", "omniserve.cli"]  # -S: no site-packages but the folder above
        return subprocess.run(
            [*cli, *args], capture_output=True, text=True, env=env, cwd=self.home, timeout=timeout, check=False
        )


def site_without(folder: Path, *left_out: str) -> Site:
    """Every entry of this environment's site-packages except the distributions named (package and metadata)."""
    site = folder / "site"
    site.mkdir(parents=True)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(left_out):
            (site / entry.name).symlink_to(entry)
    home = folder / "home"
    home.mkdir()
    return Site(site, home)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """What a plain `pip install -e .` gives: none of the quantize and train extras."""
    return site_without(tmp_path_factory.mktemp("bare"), "llmcompressor", "compressed_tensors", "accelerate", "peft")


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from omniserve.models.demo import demo_model_path

    return demo_model_path()


def test_the_site_really_lacks_the_packages(bare: Site) -> None:
    probe = bare.run("--help")
    assert probe.returncode == 0, probe.stderr[-2000:]
    env = {"PYTHONPATH": str(bare.folder), "PATH": os.environ["PATH"]}
    names = ("llmcompressor", "compressed_tensors", "accelerate", "peft", "torch")
    code = f"import importlib.util as u; print([m for m in {names!r} if u.find_spec(m)])"
    found = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, check=True)
    assert found.stdout.strip() == "['torch']"


def test_quantize_without_its_extra(bare: Site, demo_model: Path) -> None:
    output = bare.home / "quantized"
    out = bare.run("quantize", "--model", str(demo_model), "--method", "gptq", "--output", str(output))
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == QUANTIZE_MESSAGE
    assert not output.exists()


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ([], "error: accelerate is not installed here: pip install 'omniserve[train]'"),
        (["--lora"], "error: accelerate and peft are not installed here: pip install 'omniserve[train]'"),
    ],
    ids=["full", "lora"],
)
def test_train_without_its_extra(bare: Site, demo_model: Path, lora: list[str], message: str) -> None:
    data = bare.home / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    output = bare.home / f"trained{'-lora' if lora else ''}"
    out = bare.run("train", "--model", str(demo_model), "--data", str(data), "--output", str(output), *lora)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == message
    assert not output.exists()


@pytest.fixture(scope="module")
def serving_compressed_tensors(bare: Site, demo_model: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`omniserve deploy` of a compressed-tensors checkpoint, run once without compressed-tensors installed.

    The checkpoint is the demo model with a compressed-tensors ``quantization_config``: the refusal must
    come from reading config.json, before transformers reads a single weight.
    """
    checkpoint = bare.home / "ct-checkpoint"
    shutil.copytree(demo_model, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (checkpoint / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return checkpoint, bare.run("deploy", "--model", str(checkpoint), "--port", str(free_port()))


def test_serving_a_compressed_tensors_checkpoint_without_it(
    serving_compressed_tensors: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    checkpoint, out = serving_compressed_tensors
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    message = (
        f"compressed_tensors is not installed here (needed to load the compressed-tensors checkpoint {checkpoint}): "
        "pip install 'omniserve[quantize]'"
    )
    assert [line for line in out.stderr.splitlines() if "not installed" in line] == [f"ERROR:    {message}"]


def test_serving_a_compressed_tensors_checkpoint_without_it_exits_2(
    serving_compressed_tensors: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    assert serving_compressed_tensors[1].returncode == 2


def test_deploy_quant_without_its_extra(bare: Site, demo_model: Path) -> None:
    cache = bare.home / "quant-cache"
    args = ["--model", str(demo_model), "--quant", "gptq", "--quant-cache-dir", str(cache), "--quantize-only"]
    out = bare.run("deploy", *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == QUANTIZE_MESSAGE
    assert not cache.exists() or not any(cache.iterdir()), "nothing was quantized"


@pytest.mark.slow
def test_an_environment_without_the_quantize_extra_serves_what_another_cached(bare: Site, demo_model: Path) -> None:
    cache = bare.home / "shared-cache"
    code = (
        "import sys; from pathlib import Path; from omniserve.quantize.cache import entry_name; "
        "print(entry_name(Path(sys.argv[1]), 'gptq', cache_dir=Path(sys.argv[2])))"
    )
    named = subprocess.run(
        [sys.executable, "-c", code, str(demo_model), str(cache)], capture_output=True, text=True, check=True
    )
    entry = cache / named.stdout.strip().splitlines()[-1]
    entry.mkdir(parents=True)  # a published entry, as the quantization environment leaves it
    shutil.copy(demo_model / "config.json", entry / "config.json")
    (entry / "quantization_report.json").write_text("{}", encoding="utf-8")
    args = ["--model", str(demo_model), "--quant", "gptq", "--quant-cache-dir", str(cache), "--quantize-only"]
    out = bare.run("deploy", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str(entry)
