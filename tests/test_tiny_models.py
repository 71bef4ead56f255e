"""The tiny checkpoints: reproducible bytes, clean loads, working processors, templates and generation."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

OMNI_MEDIA_TOKENS = {"<|IMAGE|>": 4, "<|VIDEO|>": 8, "<|AUDIO|>": 25}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@contextmanager
def _transformers_warnings() -> Iterator[list[str]]:
    """Collect transformers' warnings (the missing/unexpected weights report is one), whatever the verbosity."""
    logger = logging.getLogger("transformers")
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level = Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _load_cleanly(model_class: Any, path: Path) -> Any:
    with _transformers_warnings() as messages:
        model = model_class.from_pretrained(path)
    assert not [m for m in messages if "LOAD REPORT" in m or "MISSING" in m or "UNEXPECTED" in m]
    return model


def _media() -> tuple[Any, np.ndarray, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    video = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    return image, video, audio


def _generate(model: Any, inputs: Any) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert 1 <= len(new) <= 5
    return new


# --------------------------------------------------------------------------- Qwen2.5-Omni


def test_omni_build_is_byte_for_byte_reproducible(tiny_omni: Path, tmp_path: Path) -> None:
    from omniserve.models import build_tiny_omni

    again = build_tiny_omni(tmp_path / "again")
    assert _digests(again) == _digests(tiny_omni)
    assert {"model.safetensors", "config.json", "spk_dict.pt", "tokenizer.json", "chat_template.jinja"} <= set(
        _digests(again)
    )


def test_omni_generates_from_image_video_and_audio(tiny_omni: Path) -> None:
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    from omniserve.models import omni_videos_kwargs

    model = _load_cleanly(Qwen2_5OmniForConditionalGeneration, tiny_omni)
    processor = AutoProcessor.from_pretrained(tiny_omni)
    content = [{"type": "image"}, {"type": "video"}, {"type": "audio"}, {"type": "text", "text": "What is this?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image, video, audio = _media()
    inputs = processor(
        text=text,
        images=image,
        videos=video,
        audio=audio,
        videos_kwargs=omni_videos_kwargs(processor),
        return_tensors="pt",
    )
    ids = inputs["input_ids"][0].tolist()
    counts = {token: ids.count(processor.tokenizer.convert_tokens_to_ids(token)) for token in OMNI_MEDIA_TOKENS}
    assert counts == OMNI_MEDIA_TOKENS
    assert inputs["video_second_per_grid"].tolist() == [1.0]  # 2 frames per temporal patch at 2 fps
    _generate(model.thinker, inputs)
    assert model.thinker.generation_config.eos_token_id == model.generation_config.eos_token_id


def test_omni_processor_class_defaults_override_saved_video_size(tiny_omni: Path) -> None:
    """Why callers pass omni_videos_kwargs: without it a 4-frame 64x64 clip is upscaled to 288 tokens.

    If this starts failing, transformers stopped overriding the saved size and the workaround can go.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_omni)
    _, video, _ = _media()
    inputs = processor(text="<|vision_bos|><|VIDEO|><|vision_eos|>", videos=video, return_tensors="pt")
    assert inputs["video_grid_thw"].prod().item() // 4 == 288


def test_omni_chat_template_places_parts_in_order(tiny_omni: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_omni)
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "audio"},
                {"type": "text", "text": " with "},
                {"type": "image"},
                {"type": "video"},
            ],
        },
        {"role": "assistant", "content": "They match."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCompare <|audio_bos|><|AUDIO|><|audio_eos|> with "
        "<|vision_bos|><|IMAGE|><|vision_eos|><|vision_bos|><|VIDEO|><|vision_eos|><|im_end|>\n"
        "<|im_start|>assistant\nThey match.<|im_end|>\n"
    )


# --------------------------------------------------------------------------- Qwen2-VL and Qwen2


def test_qwen2_vl_generates_from_image_and_video(tiny_qwen2_vl: Path) -> None:
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = _load_cleanly(Qwen2VLForConditionalGeneration, tiny_qwen2_vl)
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Describe."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>" in text
    image, video, _ = _media()
    inputs = processor(text=text, images=image, videos=video, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert (ids.count(processor.image_token_id), ids.count(processor.video_token_id)) == (4, 8)
    _generate(model, inputs)


def test_qwen2_vl_template_refuses_audio(tiny_qwen2_vl: Path) -> None:
    from jinja2 import TemplateError
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    with pytest.raises(TemplateError, match="audio"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])


def test_qwen2_text_generation_and_assistant_mask(tiny_qwen2: Path) -> None:
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model = _load_cleanly(Qwen2ForCausalLM, tiny_qwen2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    conversation = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]},
        {"role": "assistant", "content": "Once upon a time."},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a story.<|im_end|>\n"
        "<|im_start|>assistant\nOnce upon a time.<|im_end|>\n"
    )
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    spans = _runs(mask)
    assert [tokenizer.decode(ids[start:end]) for start, end in spans] == [
        "Hello! How can I help?<|im_end|>",
        "Once upon a time.<|im_end|>",
    ]
    assert all(tokenizer.decode(ids[start - 2 : start]) == "assistant\n" for start, _ in spans)

    prompt = tokenizer.apply_chat_template(
        conversation[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    _generate(model, prompt)
    eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == eos
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == eos[1]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


# --------------------------------------------------------------------------- folders and cache


def test_ensure_tiny_omni_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omniserve.models import TINY_OMNI_VERSION, ensure_tiny_omni, tiny

    builds = _count_builds(monkeypatch, tiny)
    first = ensure_tiny_omni(tmp_path)
    assert first == tmp_path / f"tiny-omni-{TINY_OMNI_VERSION}"
    assert (first / "model.safetensors").is_file()
    assert ensure_tiny_omni(tmp_path) == first
    assert builds == [1]
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folder left


def test_ensure_tiny_omni_keeps_a_copy_that_won_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishing first: its folder stays, ours is discarded."""
    from omniserve.models import TINY_OMNI_VERSION, ensure_tiny_omni, tiny

    final = tmp_path / f"tiny-omni-{TINY_OMNI_VERSION}"

    def other_process_wins(folder: Path, seed: int) -> None:
        (folder / "config.json").write_text("ours")
        final.mkdir()
        (final / "config.json").write_text("theirs")

    monkeypatch.setattr(tiny, "_write_omni", other_process_wins)
    assert ensure_tiny_omni(tmp_path) == final
    assert (final / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_builders_refuse_a_non_empty_output_and_leave_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniserve.models import build_tiny_qwen2, tiny

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_qwen2(occupied)

    def crash(folder: Path, seed: int) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_write_qwen2", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_qwen2(tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, omniserve.models; sys.exit(bool({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _count_builds(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    calls = [0]
    real = module._write_omni

    def counting(folder: Path, seed: int) -> None:
        calls[0] += 1
        real(folder, seed)

    monkeypatch.setattr(module, "_write_omni", counting)
    return calls
