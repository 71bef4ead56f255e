"""Suites: the shipped YAML files, their validation and the data staged for EvalScope (no server needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omniserve.eval.datasets import EXACT_BENCHMARK, stage_suite
from omniserve.eval.errors import DatasetMissing, InvalidSuite, UnknownSuite
from omniserve.eval.image_suite import build_image_suite
from omniserve.eval.suites import builtin_suites, load_suite, suites_dir


def test_builtin_suites_cover_text_image_and_omni() -> None:
    assert {"text-mcq", "text-qa", "image-mcq", "omni-synth"} <= set(builtin_suites())
    formats = {name: load_suite(name).format for name in builtin_suites()}
    assert formats["text-mcq"] == "mcq" and formats["text-qa"] == "qa"
    assert formats["image-mcq"] == "vmcq" and formats["omni-synth"] == "vqa"


def test_unknown_suite_lists_the_known_ones() -> None:
    with pytest.raises(UnknownSuite, match=r"unknown suite 'nope'.*text-mcq"):
        load_suite("nope")


def test_suite_file_that_does_not_validate_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndescription: x\nformat: mcq\nscoring: accuracy\ndata: d\nsubsets: [a]\nmax_tokenz: 3\n")
    with pytest.raises(InvalidSuite) as info:
        load_suite(bad)
    assert str(bad) in str(info.value) and "max_tokenz: Extra inputs are not permitted" in str(info.value)
    bad.write_text("name: bad\ndescription: x\nformat: mcq\nscoring: exact\ndata: d\nsubsets: [a]\n")
    with pytest.raises(InvalidSuite, match="format 'mcq' cannot be scored with 'exact'"):
        load_suite(bad)
    bad.write_text("name: bad\ndescription: x\nformat: qa\nscoring: rouge\nmetrics: [BLEU]\ndata: d\nsubsets: [a]\n")
    with pytest.raises(InvalidSuite, match="'metrics' must include Rouge"):
        load_suite(bad)


def test_suite_file_that_is_not_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InvalidSuite, match="not valid YAML"):
        load_suite(bad)


def test_missing_data_file_is_reported_before_anything_runs(tmp_path: Path) -> None:
    folder = tmp_path / "suite"
    shutil.copytree(suites_dir() / "text-mcq", folder / "text-mcq")
    (folder / "text-mcq" / "knowledge_val.jsonl").unlink()
    shutil.copy(suites_dir() / "text-mcq.yaml", folder / "text-mcq.yaml")
    with pytest.raises(DatasetMissing, match=r"knowledge_val\.jsonl is missing \(subset 'knowledge'\)"):
        stage_suite(load_suite(folder / "text-mcq.yaml"), tmp_path / "staged", limit=None, cache_dir=tmp_path)


def test_missing_media_file_is_reported(tmp_path: Path) -> None:
    folder = tmp_path / "image-mcq"
    shutil.copytree(suites_dir() / "image-mcq", folder)
    (folder / "images" / "shape-03.png").unlink()
    shutil.copy(suites_dir() / "image-mcq.yaml", tmp_path / "image-mcq.yaml")
    with pytest.raises(DatasetMissing, match=r"names media 'images/shape-03\.png'"):
        stage_suite(load_suite(tmp_path / "image-mcq.yaml"), tmp_path / "staged", limit=None, cache_dir=tmp_path)


def test_committed_image_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    build_image_suite(tmp_path)
    committed = suites_dir() / "image-mcq"
    for file in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        assert (committed / file.relative_to(tmp_path)).read_bytes() == file.read_bytes(), file.name


def test_image_items_name_absolute_media_after_staging(tmp_path: Path) -> None:
    staged = stage_suite(load_suite("image-mcq"), tmp_path / "staged", limit=3, cache_dir=tmp_path)
    assert staged.benchmark == "general_vmcq" and staged.totals == {"colour": 3, "shape": 3}
    rows = [json.loads(line) for line in (tmp_path / "staged" / "colour_val.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(Path(r["image_1"]).is_absolute() and Path(r["image_1"]).is_file() for r in rows)


def test_omni_synth_sends_video_and_audio_as_openai_parts(tmp_path: Path) -> None:
    staged = stage_suite(load_suite("omni-synth"), tmp_path / "staged", limit=2, cache_dir=tmp_path / "cache")
    assert staged.benchmark == EXACT_BENCHMARK
    assert staged.totals == {"colour": 2, "motion": 2, "pitch": 2, "larger": 2, "mixed": 2}
    kinds: dict[str, set[str]] = {}
    for subset in staged.totals:
        for line in (tmp_path / "staged" / f"{subset}_test.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert row["answer"] and row["messages"][-1]["role"] == "user"  # the answer is not in the request
            for message in row["messages"]:
                if isinstance(message["content"], list):
                    for part in message["content"]:
                        kinds.setdefault(subset, set()).add(part["type"])
                        if part["type"] == "input_audio":
                            assert (
                                part["input_audio"]["format"] == "wav" and Path(part["input_audio"]["data"]).is_file()
                            )
                        if part["type"] == "video_url":
                            assert Path(part["video_url"]["url"]).suffix == ".mp4"
    assert "video_url" in kinds["motion"] and "input_audio" in kinds["pitch"]
    assert {"image_url", "input_audio"} <= kinds["mixed"]


def test_generated_data_is_cached(tmp_path: Path) -> None:
    suite = load_suite("omni-synth")
    stage_suite(suite, tmp_path / "a", limit=1, cache_dir=tmp_path / "cache")
    [entry] = (tmp_path / "cache" / "data").iterdir()
    marker = entry / "done"
    before = marker.stat().st_mtime_ns
    stage_suite(suite, tmp_path / "b", limit=1, cache_dir=tmp_path / "cache")
    assert marker.stat().st_mtime_ns == before


def test_importing_the_commands_loads_nothing_heavy() -> None:
    code = (
        "import sys, omniserve.eval.cli; "
        "print(sorted(m for m in ('evalscope', 'torch', 'matplotlib', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
