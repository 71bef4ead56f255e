"""``ensure_quantized`` (behind ``deploy --quant``): quantize on a miss, reuse on a hit, never twice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omniserve.quantize.cache import EntryChoices, ensure_quantized, entry_name, entry_stem, is_complete, maker_key


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant-cache")


@pytest.fixture(scope="module")
def first(tiny_qwen2: Path, cache_dir: Path) -> Path:
    return ensure_quantized(tiny_qwen2, "fp8", cache_dir=cache_dir, progress=False)


def test_miss_quantizes_into_the_cache(first: Path, cache_dir: Path, tiny_qwen2: Path) -> None:
    assert first.parent == cache_dir
    assert first.name.startswith("tiny-qwen2-fp8-")
    assert is_complete(first)
    assert (
        json.loads((first / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    )


def test_second_call_is_a_hit_and_quantizes_nothing(first: Path, cache_dir: Path, tiny_qwen2: Path) -> None:
    report = first / "quantization_report.json"
    before = (first.stat().st_ino, report.stat().st_ino, report.stat().st_mtime_ns, report.read_bytes())
    entries = _entries(cache_dir)
    again = ensure_quantized(tiny_qwen2, "fp8", cache_dir=cache_dir, progress=False)
    assert again == first
    assert (first.stat().st_ino, report.stat().st_ino, report.stat().st_mtime_ns, report.read_bytes()) == before
    assert _entries(cache_dir) == entries  # no new entry, no staging folder


def _entries(cache_dir: Path) -> list[str]:
    """The cache folder's names but the fingerprint memo (first written once the model's files settled)."""
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".fingerprints.json"))


def test_key_follows_content_not_path(first: Path, cache_dir: Path, tiny_qwen2: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_qwen2, tmp_path / "tiny-qwen2")  # same folder name, other place, same bytes
    assert entry_name(copy, "fp8", cache_dir=cache_dir) == first.name
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert entry_name(copy, "fp8", cache_dir=cache_dir) != first.name


def test_key_follows_method_scheme_recipe_and_calibration(tiny_qwen2: Path, cache_dir: Path, tmp_path: Path) -> None:
    from omniserve.quantize.recipes import recipes_dir

    base = entry_name(tiny_qwen2, "gptq", cache_dir=cache_dir)
    assert entry_name(tiny_qwen2, "awq", cache_dir=cache_dir) != base
    assert entry_name(tiny_qwen2, "gptq", cache_dir=cache_dir, choices=EntryChoices(scheme="W8A16")) != base
    assert entry_name(tiny_qwen2, "gptq", cache_dir=cache_dir, choices=EntryChoices(num_samples=7)) != base
    tweaked = tmp_path / "gptq.yaml"
    tweaked.write_text(
        (recipes_dir() / "gptq.yaml").read_text().replace("dampening_frac: 0.01", "dampening_frac: 0.02")
    )
    assert entry_name(tiny_qwen2, "gptq", cache_dir=cache_dir, choices=EntryChoices(recipe=tweaked)) != base
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    assert entry_name(tiny_qwen2, "gptq", cache_dir=cache_dir, choices=EntryChoices(calibration=calibration)) != base


def test_already_quantized_folder_is_served_as_is(first: Path, cache_dir: Path) -> None:
    assert ensure_quantized(first, "awq", cache_dir=cache_dir / "elsewhere") == first
    assert not (cache_dir / "elsewhere").exists()


def test_deploy_serves_the_cached_quantization(first: Path, tiny_qwen2: Path, cache_dir: Path, tmp_path: Path) -> None:
    from omniserve.cli import prepared_checkpoint
    from omniserve.config import DeployOptions
    from omniserve.paths import Folders

    folders = Folders(tmp_path / "unused")  # --quant-cache-dir wins over the default folder
    assert prepared_checkpoint(DeployOptions(model=tiny_qwen2), folders) == tiny_qwen2
    options = DeployOptions(model=tiny_qwen2, quant="fp8", quant_cache_dir=cache_dir)
    assert prepared_checkpoint(options, folders) == first
    assert not folders.root.exists()


def test_the_name_is_a_stem_every_environment_computes_and_the_makers_versions(
    first: Path, tiny_qwen2: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniserve.quantize import cache
    from omniserve.quantize.report import library_versions, read_report

    stem = entry_stem(tiny_qwen2, "fp8", cache_dir=cache_dir)
    assert first.name == f"{stem}-v{maker_key(library_versions())}"
    report = read_report(first)
    assert (
        report is not None and first.name == f"{stem}-v{maker_key(report['versions'])}"
    )  # the report says who made it
    other = {**library_versions(), "llmcompressor": "0.0.1", "compressed-tensors": "0.0.1"}
    monkeypatch.setattr(cache, "library_versions", lambda: other)
    assert entry_stem(tiny_qwen2, "fp8", cache_dir=cache_dir) == stem
    assert entry_name(tiny_qwen2, "fp8", cache_dir=cache_dir) == f"{stem}-v{maker_key(other)}" != first.name


def test_naming_an_entry_imports_no_quantizer(tiny_qwen2: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from omniserve.quantize.cache import EntryChoices, entry_stem; "
        "choices = EntryChoices(scheme='W8A16', num_samples=7); "
        "entry_stem(Path(sys.argv[1]), 'gptq', cache_dir=Path(sys.argv[2]), choices=choices); "
        "print(sorted(m for m in ('llmcompressor', 'compressed_tensors') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_qwen2), str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_other_quantizer_versions_are_a_miss_where_the_extra_is_installed(
    first: Path, tiny_qwen2: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniserve.quantize import cache
    from omniserve.quantize.report import library_versions

    other = {**library_versions(), "llmcompressor": "0.0.1"}
    monkeypatch.setattr(cache, "library_versions", lambda: other)
    report = (first / "quantization_report.json").read_bytes()
    made = ensure_quantized(tiny_qwen2, "fp8", cache_dir=cache_dir, progress=False)
    assert made != first and made.name == f"{entry_stem(tiny_qwen2, 'fp8', cache_dir=cache_dir)}-v{maker_key(other)}"
    assert is_complete(made) and (first / "quantization_report.json").read_bytes() == report  # beside, not over
    shutil.rmtree(made)  # the module's other tests expect one entry


def test_without_the_extra_any_makers_entry_is_a_hit_and_a_miss_refuses(
    first: Path, tiny_qwen2: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniserve.extras import MissingExtra
    from omniserve.quantize import cache

    monkeypatch.setattr(cache, "missing_modules", lambda modules: ["llmcompressor"])
    before = _entries(cache_dir)
    assert ensure_quantized(tiny_qwen2, "fp8", cache_dir=cache_dir, progress=False) == first
    assert _entries(cache_dir) == before  # no lock, no staging: a read-only volume serves as well
    with pytest.raises(MissingExtra) as refused:
        ensure_quantized(tiny_qwen2, "gptq", cache_dir=cache_dir, progress=False)
    assert refused.value.exit_code == 2 and "pip install 'omniserve[quantize]'" in str(refused.value)
    assert _entries(cache_dir) == before
    empty = tmp_path / "never-made"
    with pytest.raises(MissingExtra):
        ensure_quantized(tiny_qwen2, "fp8", cache_dir=empty, progress=False)
    assert not empty.exists()
