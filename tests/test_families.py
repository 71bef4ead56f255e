"""The family matrix: every registered model family, built tiny with its publisher's chat template, through every path.

Per family (``omniserve/models/families``): serve text and every medium it takes through the real
gateway (uvicorn + the official openai client, transformers engine: streaming, ``n``, ``stop``,
usage), refuse the media it cannot take with a 400 naming the model and the medium, prove that the
served prompt is the trained prompt on the published template (``check_parity``), train two steps
(all weights, then LoRA), and quantize with the towers kept and serve the result. Each passing cell
is recorded (``tests/family_matrix.py``) and ``python -m omniserve.models.matrix`` renders
``docs/models.md`` from the record.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from omniserve.config import MediaLimits
from omniserve.models.families import FAMILIES, MEDIA_KINDS, Family, get
from tests.conftest import FamilyModels, RunningServer, start_server
from tests.family_matrix import MatrixRecorder, recorder_fixture
from tests.media_factory import audio_bytes, png_bytes, video_bytes
from tests.test_train_support import published_template, write_jsonl

pytestmark = pytest.mark.families

FAMILY_NAMES = [family.name for family in FAMILIES]
matrix = recorder_fixture("models-matrix.json")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


#: One small item of each medium, as content parts (data URLs: nothing is fetched).
MEDIA_PARTS: dict[str, dict[str, Any]] = {
    "image": {"type": "image_url", "image_url": {"url": data_url("image/png", png_bytes(64, 64))}},
    "video": {"type": "video_url", "video_url": {"url": data_url("video/mp4", video_bytes("mp4", seconds=1, fps=4))}},
    "audio": {
        "type": "input_audio",
        "input_audio": {
            "data": base64.b64encode(audio_bytes("wav", 1.0, sample_rate=16_000)).decode(),
            "format": "wav",
        },
    },
}
QUESTION = {"image": "What colour is this?", "video": "Which way does it move?", "audio": "High or low?"}
#: Families whose images reach the decoder through cross-attention layers, not as tokens in the prompt.
CROSS_ATTENTION = frozenset({"mllama"})


@pytest.fixture(scope="session")
def family_checkpoint(family_model: FamilyModels, matrix: MatrixRecorder) -> Callable[[str], Path]:
    """``family_checkpoint(name)``: the family's tiny checkpoint with its published template, built once a session
    (shared with the engine tests), its build time a figure of the matrix."""

    def get_checkpoint(name: str) -> Path:
        folder = family_model(name)
        matrix.figure(name, "build_seconds", family_model.seconds[name])
        return folder

    return get_checkpoint


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def served(
    request: pytest.FixtureRequest, family_checkpoint: Callable[[str], Path]
) -> Iterator[tuple[Family, RunningServer]]:
    """One server per family (pytest groups the tests by family, so each starts once)."""
    family = get(request.param)
    server = start_server(
        family_checkpoint(family.name),
        name=f"tiny-{family.name}",
        engine={"max_concurrency": 4, "max_model_len": 1024},
        server={"media": MediaLimits(max_video_seconds=5, max_audio_seconds=5)},
    )
    yield family, server
    server.stop()


def _chat(server: RunningServer, content: Any, **kwargs: Any) -> Any:
    return server.client().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_text_streams_with_n_stop_and_usage(served: tuple[Family, RunningServer], matrix: MatrixRecorder) -> None:
    family, server = served
    with matrix.cell(family.name, "text"):
        reply = _chat(server, "Say something.", n=2, max_tokens=6, temperature=1.0, seed=1, stop=["\n"])
        assert len(reply.choices) == 2
        assert all(
            c.finish_reason in ("stop", "length") and "\n" not in (c.message.content or "") for c in reply.choices
        )
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
        chunks = list(
            _chat(
                server,
                "Say something.",
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
                temperature=0,
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
        assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)


@pytest.mark.parametrize("kind", MEDIA_KINDS)
def test_each_medium_is_served_or_refused_naming_model_and_medium(
    served: tuple[Family, RunningServer], kind: str, matrix: MatrixRecorder
) -> None:
    family, server = served
    content = [MEDIA_PARTS[kind], {"type": "text", "text": QUESTION[kind]}]
    if kind not in family.modalities:
        with matrix.cell(family.name, kind, ok="refused"):
            with pytest.raises(openai.BadRequestError) as caught:
                _chat(server, content, max_tokens=2)
            message = caught.value.body["message"]
            assert server.model_name in message and f"does not accept {kind}" in message
            assert caught.value.body["param"] == "messages[0].content[0]"
        return
    with matrix.cell(family.name, kind):
        text_only = _chat(server, [{"type": "text", "text": QUESTION[kind]}], max_tokens=1).usage.prompt_tokens
        reply = _chat(server, content, max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        if family.name in CROSS_ATTENTION:  # its image is one <|image|> token; its template drops the system turn
            assert reply.usage.prompt_tokens != text_only
        else:
            assert reply.usage.prompt_tokens > text_only  # the medium became feature tokens
        stream = list(_chat(server, content, max_tokens=3, stream=True, temperature=0))
        assert stream[-1].choices[0].finish_reason in ("stop", "length")


# --------------------------------------------------------------------------- training side


ANSWERS = {"text": "five", "image": "red", "video": "right", "audio": "low"}
MEDIA_FILES = {"image": "media/red.png", "video": "media/clip.mp4", "audio": "media/tone.wav"}
FILE_PART = {
    "image": lambda path: {"type": "image_url", "image_url": {"url": path}},
    "video": lambda path: {"type": "video_url", "video_url": {"url": path}},
    "audio": lambda path: {"type": "audio_url", "audio_url": {"url": path}},
}


def family_conversations(family: Family) -> list[list[dict[str, Any]]]:
    """A single-turn text chat, a two-turn chat with a system prompt, and one chat per medium the family takes."""
    conversations: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": ANSWERS["text"]}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "blue"},
        ],
    ]
    for kind in family.media:
        part = FILE_PART[kind](MEDIA_FILES[kind])
        conversations.append(
            [
                {"role": "user", "content": [part, {"type": "text", "text": QUESTION[kind]}]},
                {"role": "assistant", "content": ANSWERS[kind]},
            ]
        )
    return conversations


@pytest.fixture(scope="session")
def family_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], Path]:
    """``family_data(family)``: a JSONL file of ``family_conversations`` beside real media files."""
    from tests.test_train_support import write_media

    root = tmp_path_factory.mktemp("family-data")
    write_media(root)

    def get_data(family: Family) -> Path:
        return write_jsonl(root / f"{family.name}.jsonl", family_conversations(family))

    return get_data


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_served_prompts_are_trained_prompts_on_the_published_template(
    name: str, family_checkpoint: Callable[[str], Path], family_data: Callable[[Family], Path], matrix: MatrixRecorder
) -> None:
    import asyncio

    from omniserve.templates.render import PromptRenderer
    from omniserve.templates.training import IGNORE_INDEX, render_training_examples
    from omniserve.train.data import read_conversations
    from omniserve.train.features import limits_for, load_messages
    from omniserve.train.parity import check_parity

    family = get(name)
    data = family_data(family)
    with matrix.cell(name, "parity"):
        renderer = PromptRenderer.from_pretrained(family_checkpoint(name))
        conversations = read_conversations(data)
        report = check_parity(renderer, conversations, limits_for(data))
        problems = [str(d) for d in report.differences]
        if report.turns != len(conversations) + 1:
            problems.append(f"{report.turns} turns checked")
        # the last conversation holds the family's richest medium: its labels are the answer and its stop token
        last = conversations[-1]
        messages, media = asyncio.run(load_messages(last, last.messages, limits_for(data)))
        (example,) = render_training_examples(renderer, messages, media).examples
        served = renderer.render_chat(messages[:1], media, add_generation_prompt=True)
        labelled = [t for t in example.labels if t != IGNORE_INDEX]
        if example.input_ids[: served.num_tokens] != served.token_ids:
            problems.append("the served prompt is not the start of the training example")
        if example.labels[: served.num_tokens] != [IGNORE_INDEX] * served.num_tokens:
            problems.append("labels on the served prompt")
        learned = renderer.tokenizer.decode(labelled)
        answer = last.messages[-1].content
        if not learned.strip().startswith(answer) or len(learned) > len(answer) + 24:
            problems.append(f"the labels decode to {learned!r}, not the answer {answer!r} and its stop token")
        if "parity" in family.gaps:  # a known gap must still show: once it does not, take it out of Family.gaps
            assert problems, f"{family.title} passes parity now: remove its 'parity' gap"
            matrix.gap(name, "parity", family.gaps["parity"])
            return
        assert not problems, "\n".join(problems)
        matrix.figure(name, "mask_strategy", report.describe_strategies())
        matrix.figure(
            name,
            "tokens",
            {"served_prompt": served.num_tokens, "trained": len(example.input_ids), "labelled": len(labelled)},
        )


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_two_training_steps_full_and_lora(
    name: str,
    family_checkpoint: Callable[[str], Path],
    family_data: Callable[[Family], Path],
    tmp_path: Path,
    matrix: MatrixRecorder,
) -> None:
    import math

    from omniserve.train.options import TrainOptions
    from omniserve.train.sft import run_training

    family = get(name)
    for column in ("train", "lora"):
        if column in family.gaps:
            matrix.gap(name, column, family.gaps[column])
    if "train" in family.gaps:
        pytest.skip(family.gaps["train"])
    common = {"model": family_checkpoint(name), "data": family_data(family), "max_steps": 2, "batch_size": 2}
    with matrix.cell(name, "train"):
        full = run_training(TrainOptions(output=tmp_path / "full", progress=False, **common))
        assert full.global_step == 2 and all(math.isfinite(loss) for loss in full.losses)
        assert (tmp_path / "full" / "config.json").is_file()
        # saved under the names the source (as publishers ship the family) carries, which vLLM maps
        assert _weight_names(tmp_path / "full") == _weight_names(common["model"])
    with matrix.cell(name, "lora"):
        lora = run_training(TrainOptions(output=tmp_path / "lora", lora=True, lora_rank=4, progress=False, **common))
        assert lora.global_step == 2 and lora.adapter is not None
        assert (lora.adapter / "adapter_config.json").is_file()


@pytest.mark.parametrize("name", ["llava", "qwen2_audio"])  # a tower prefix, and Qwen2-Audio's doubled ``model.``
def test_training_saves_the_published_weight_names_whatever_the_source_carries(
    name: str, family_checkpoint: Callable[[str], Path], family_data: Callable[[Family], Path], tmp_path: Path
) -> None:
    """A source written by transformers 5 from a model it did not load (its tower names then differ from any
    published checkpoint's, and vLLM refuses them) comes out of training under the names the family's publishers
    ship (``Family.legacy_names``)."""
    import shutil

    from omniserve.models.loading import load_checkpoint
    from omniserve.train.options import TrainOptions
    from omniserve.train.sft import run_training

    published = family_checkpoint(name)
    source = tmp_path / "source"
    shutil.copytree(published, source, ignore=shutil.ignore_patterns("*.safetensors"))
    loaded = load_checkpoint(published, dtype="float32").model
    fresh = type(loaded)(loaded.config)  # a model transformers built, as a user's script or another trainer does
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(source)
    assert _weight_names(source) != _weight_names(published), "transformers wrote the published names itself"
    options = TrainOptions(
        model=source, data=family_data(get(name)), output=tmp_path / "out", max_steps=2, batch_size=2, progress=False
    )
    run_training(options)
    assert _weight_names(tmp_path / "out") == _weight_names(published)
    assert load_checkpoint(tmp_path / "out", dtype="float32").report.lines() == []


def _weight_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as weights:
            names.update(weights.keys())
    return names


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_quantized_with_towers_kept_and_served(
    name: str, family_checkpoint: Callable[[str], Path], tmp_path: Path, matrix: MatrixRecorder
) -> None:
    from omniserve.models.loading import load_checkpoint
    from omniserve.quantize.options import QuantizeOptions
    from omniserve.quantize.run import quantize

    family = get(name)
    with matrix.cell(name, "quantize"):
        out = quantize(
            QuantizeOptions(model=family_checkpoint(name), method="fp8", output=tmp_path / "fp8", progress=False)
        ).output
        assert load_checkpoint(out, dtype="auto", allow_auto_dtype=True).report.lines() == []
        # the towers are named as kept (Phi-4-multimodal's sit inside its decoder module and were once quantized)
        ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
        assert [name for name in ignore if "lm_head" not in name], ignore
        # the default dtype (auto: bfloat16 on CPUs with native bf16) over layers saved in float32 and dequantized ones
        server = start_server(out, name="quantized", server={"media": MediaLimits()})
        try:
            kind = family.media[0]
            content = [MEDIA_PARTS[kind], {"type": "text", "text": QUESTION[kind]}]
            reply = _chat(server, content, max_tokens=3, temperature=0)
            assert reply.choices[0].finish_reason in ("stop", "length")
        finally:
            server.stop()


# --------------------------------------------------------------------------- omniserve models, unknown architectures


def test_models_command_describes_each_family(family_checkpoint: Callable[[str], Path]) -> None:
    import json

    from typer.testing import CliRunner

    from omniserve.cli import app

    for family in FAMILIES:
        result = CliRunner().invoke(app, ["models", "--model", str(family_checkpoint(family.name)), "--json"])
        assert result.exit_code == 0, result.output
        described = json.loads(result.output)
        assert described["family"] == family.title
        assert described["architecture"] == family.architectures[0]
        assert set(described["modalities"]) == family.modalities
        expected = "markers" if "{% generation %}" in published_template(family.template or "") else "prefix"
        if family.name in ("llava_onevision", "llava_next_video"):  # `assistant \n` in history, `assistant\n` served
            expected = "served-prompt"
        assert described["mask_strategy"].startswith(expected), described["mask_strategy"]
        assert described["quantization"] == "none"
    text = CliRunner().invoke(app, ["models", "--model", str(family_checkpoint("llava_onevision"))])
    rows = dict(line.split(None, 1) for line in text.output.splitlines() if line.startswith(("family", "engines")))
    assert rows == {"family": "LLaVA-OneVision", "engines": "transformers, vllm"}
    assert "served-prompt: the template writes past assistant turns unlike its generation prompt" in text.output


def test_an_unknown_architecture_is_named_with_the_nearest_family(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from omniserve.cli import app
    from omniserve.errors import ModelLoadError
    from omniserve.models.loading import load_checkpoint

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen9VLForConditionalGeneration"], "model_type": "qwen9_vl"})
    )
    result = CliRunner().invoke(app, ["models", "--model", str(tmp_path)])
    assert result.exit_code == 1
    assert "architecture Qwen9VLForConditionalGeneration is not supported" in result.output
    assert "nearest supported family is Qwen3-VL" in result.output  # ties with Qwen2-VL; the later name wins
    with pytest.raises(ModelLoadError, match="nearest supported family is Qwen3-VL"):
        load_checkpoint(tmp_path)


def test_a_refused_family_is_refused_at_load_saying_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A family omniserve knows it cannot run (``Family.refused``) is refused by name at load, before any engine
    tries it. None is refused today (Mllama, the last one, is served since its cross-attention support), so a
    stand-in family is registered for a real architecture, as a family module would register it."""
    from omniserve.errors import ModelLoadError
    from omniserve.models import families
    from omniserve.models.loading import load_checkpoint

    stand_in = Family(
        name="stand_in",
        title="Stand-in",
        architectures=("FuyuForCausalLM",),
        modalities=frozenset({"text", "image"}),
        refused="a reason the family module gives",
    )
    monkeypatch.setitem(families._BY_ARCH, "FuyuForCausalLM", stand_in)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FuyuForCausalLM"], "model_type": "fuyu"}))
    expected = "architecture FuyuForCausalLM (Stand-in) is not supported: a reason the family module gives"
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        load_checkpoint(tmp_path)
    assert all(not family.refused for family in FAMILIES)


def test_phi4_media_are_its_placeholders_in_a_template_that_takes_only_strings(
    family_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """Microsoft's Phi-4-multimodal template adds ``message['content']`` to a string, so parts fail in it: every turn
    gets a string, each medium written as the placeholder transformers' processor expands, where it stands in the turn.
    Served and trained tokens are then exactly those of transformers' own template given parts."""
    import numpy as np
    from PIL import Image

    from omniserve.media.audio import DecodedAudio
    from omniserve.media.loader import MediaItem
    from omniserve.templates.content_format import with_string_content
    from omniserve.templates.render import PromptRenderer
    from omniserve.templates.training import render_training_examples
    from omniserve.train.model_io import LORA_TARGETS
    from tests.test_train_support import with_chat_template

    checkpoint = family_checkpoint("phi4_multimodal")
    renderer = PromptRenderer.from_pretrained(checkpoint)
    parts = PromptRenderer.from_pretrained(
        with_chat_template(checkpoint, tmp_path / "parts", published_template("phi4_multimodal_parts"))
    )
    assert renderer.string_content_roles() == {"system", "user", "assistant"}
    assert parts.string_content_roles() == frozenset()
    text = lambda s: {"type": "text", "text": s}  # noqa: E731
    conversation = [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [{"type": "image", "image": ""}, text("What colour?"), {"type": "audio"}]},
        {"role": "assistant", "content": [text("red")]},
        {"role": "user", "content": [{"type": "image", "image": ""}, text("And this one?")]},
    ]
    picture = lambda: Image.fromarray(np.full((48, 64, 3), 200, dtype=np.uint8))  # noqa: E731
    tone = DecodedAudio(np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 440).astype(np.float32), 16_000)
    media = [MediaItem("image", picture()), MediaItem("audio", tone), MediaItem("image", picture())]
    written = renderer.template_conversation(conversation)
    assert [turn["content"] for turn in written] == [
        "Answer briefly.",
        "<|image|>What colour?<|audio|>",
        "red",
        "<|image|>And this one?",
    ]
    served, expected = renderer.render_chat(conversation, media), parts.render_chat(conversation, media)
    assert served.token_ids == expected.token_ids
    assert {"image_pixel_values", "audio_input_features"} <= set(served.mm_inputs)
    image_id = renderer.tokenizer.convert_tokens_to_ids("<|image|>")
    assert served.token_ids.count(image_id) > 2 * 256  # each image expanded into its features
    (trained,) = render_training_examples(renderer, conversation[:3], media[:2]).examples
    (reference,) = render_training_examples(parts, conversation[:3], media[:2]).examples
    assert (trained.input_ids, trained.labels) == (reference.input_ids, reference.labels)
    numbered = {"image": "<|image_{index}|>", "audio": "<|audio_{index}|>"}  # numbered per kind across the conversation
    assert [m["content"] for m in with_string_content(conversation, frozenset({"user"}), numbered)][1::2] == [
        "<|image_1|>What colour?<|audio_1|>",
        "<|image_2|>And this one?",
    ]
    # LoRA adapts its decoder's fused projections too, never the audio encoder's (towers stay frozen)
    fused = [name.removesuffix(".weight") for name in _weight_names(checkpoint) if re.search(r"_proj\.weight$", name)]
    decoder = {name for name in fused if name.startswith("model.layers.")}
    assert {name for name in fused if re.fullmatch(LORA_TARGETS, name)} == decoder
    assert {name.rsplit(".", 1)[1] for name in decoder} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_roles_a_template_prints_as_is_get_their_text_as_a_string(family_checkpoint: Callable[[str], Path]) -> None:
    """GLM-4.1V's template walks a user turn's parts but prints system and assistant content as-is: those turns get
    a string (else the prompt holds the parts' Python repr); a template that walks every role's parts keeps them."""
    from jinja2 import Environment

    from omniserve.templates.content_format import roles_printing_content, with_string_content
    from omniserve.templates.render import PromptRenderer

    mixed = Environment().from_string(
        "{% for m in messages %}{% if m.role == 'user' %}{% for p in m.content %}{{ p.text }}{% endfor %}"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    assert roles_printing_content(lambda msgs: mixed.render(messages=msgs)) == {"system", "assistant"}
    turns = [
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "image", "image": ""}]},  # not text-only: left to the template
        {"role": "user", "content": [{"type": "text", "text": "u"}]},
    ]
    assert with_string_content(turns, frozenset({"assistant"})) == [{"role": "assistant", "content": "ab"}, *turns[1:]]

    glm = PromptRenderer.from_pretrained(family_checkpoint("glm4v"))
    text = lambda s: [{"type": "text", "text": s}]  # noqa: E731
    conversation = [
        {"role": "system", "content": text("Answer briefly.")},
        {"role": "user", "content": text("Name a colour.")},
        {"role": "assistant", "content": text("red")},
        {"role": "user", "content": text("Another one?")},
    ]
    prompt = glm.tokenizer.decode(glm.render_chat(conversation, []).token_ids)
    assert "'type'" not in prompt and "<|system|>\nAnswer briefly.<|user|>\nName a colour.<|assistant|>\nred" in prompt
    for name in ("qwen2_vl", "gemma3", "llava"):  # templates that walk parts for every role are left as they were
        assert PromptRenderer.from_pretrained(family_checkpoint(name)).string_content_roles() == frozenset()


def test_gemma3n_kv_shared_layers_answer_as_transformers_generate(family_checkpoint: Callable[[str], Path]) -> None:
    """Gemma 3n's last layers read the keys and values of earlier ones, never a cache of their own: on the engine's
    preallocated cache (chunked prefill, a batch, prefixes reused from the prefix cache) greedy answers are the
    tokens transformers' ``generate`` gives, for a text prompt longer than the sliding window, an image and audio."""
    import io
    import threading

    import soundfile
    from PIL import Image
    from transformers import AutoProcessor

    from omniserve.models.loading import load_checkpoint

    model_dir, steps = family_checkpoint("gemma3n"), 12
    prompts: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
        "text": ([{"type": "text", "text": " ".join(["the river runs past the old mill"] * 12)}], {}),
        "image": (
            [{"type": "image"}, {"type": "text", "text": QUESTION["image"]}],
            {"images": [Image.open(io.BytesIO(png_bytes(64, 64))).convert("RGB")]},
        ),
        "audio": (
            [{"type": "audio"}, {"type": "text", "text": QUESTION["audio"]}],
            {"audio": [soundfile.read(io.BytesIO(audio_bytes("wav", 1.0, sample_rate=16_000)), dtype="float32")[0]]},
        ),
    }
    processor = AutoProcessor.from_pretrained(model_dir)
    model = load_checkpoint(model_dir, dtype="float32").model
    expected, lengths = {}, {}
    for kind, (parts, media) in prompts.items():
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        inputs = processor(text=text, return_tensors="pt", **media)
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        lengths[kind] = inputs["input_ids"].shape[1]
        expected[kind] = processor.tokenizer.decode(out[0, lengths[kind] :], skip_special_tokens=True)
    window = model.config.text_config.sliding_window
    assert lengths["text"] > window and lengths["audio"] > window and model.config.text_config.num_kv_shared_layers

    server = start_server(model_dir, name="gemma3n", engine={"dtype": "float32", "max_concurrency": 4})
    try:
        content = {"text": prompts["text"][0], "image": [MEDIA_PARTS["image"], prompts["image"][0][1]]}
        content["audio"] = [MEDIA_PARTS["audio"], prompts["audio"][0][1]]
        extra = {"min_tokens": steps, "ignore_eos": True}
        answers: dict[str, str | None] = {}

        def answer(kind: str) -> None:
            reply = _chat(server, content[kind], max_tokens=steps, temperature=0, extra_body=extra)
            answers[kind] = reply.choices[0].message.content

        for _ in range(2):  # one prompt after another, then again from the prefix cache
            for kind in prompts:
                answer(kind)
            assert answers == expected
        threads = [threading.Thread(target=answer, args=(kind,)) for kind in prompts]  # decoded as one batch
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == expected
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("config_class", "arch", "why", "nearest"),
    [
        ("Blip2Config", "Blip2ForConditionalGeneration", "vision_config", "LLaVA-1.5"),
        ("T5Config", "T5ForConditionalGeneration", "", ""),
    ],
)
def test_a_checkpoint_without_a_family_that_is_not_a_text_only_causal_lm_is_refused_at_load(
    config_class: str, arch: str, why: str, nearest: str, tmp_path: Path
) -> None:
    """Transformers ships these, with no family module here: refused naming the architecture and the nearest family,
    decided from the config (its media sub-configs, or a class that is not a causal LM), not from their names."""
    import transformers

    from omniserve.errors import ModelLoadError
    from omniserve.models.loading import load_checkpoint

    config = getattr(transformers, config_class)(architectures=[arch])
    config.save_pretrained(tmp_path)  # the config.json a published checkpoint of this architecture carries
    expected = f"architecture {arch} is not supported: "
    expected += f"it is a multimodal model (its config has {why})" if why else "transformers does not register it"
    with pytest.raises(ModelLoadError, match=re.escape(expected)) as caught:
        load_checkpoint(tmp_path)
    assert f"the nearest supported family is {nearest}" in str(caught.value)


def test_a_thinker_only_qwen2_5_omni_folder_is_the_omni_family(tmp_path: Path) -> None:
    """Training's checkpoints and thinker-only folders declare the thinker class: still Qwen2.5-Omni, not refused
    as a multimodal model without a family (which stopped ``omniserve train --model`` on its own checkpoint)."""
    import transformers

    from omniserve.models.families import family_for

    config = transformers.Qwen2_5OmniThinkerConfig(architectures=["Qwen2_5OmniThinkerForConditionalGeneration"])
    config.save_pretrained(tmp_path)
    assert family_for(json.loads((tmp_path / "config.json").read_text())).name == "qwen2_5_omni"


def test_matrix_renders_failures_gaps_and_untested_cells() -> None:
    from omniserve.models.matrix import render

    record = {
        "cells": {"qwen2_vl": {"text": "ok", "image": "failed", "audio": "refused", "train": "gap: not wired"}},
        "versions": {"transformers": "5.17.0"},
    }
    page = render(record)
    row = next(line for line in page.splitlines() if line.startswith("| Qwen2-VL |"))
    assert row.split(" | ")[2:6] == ["yes", "**FAILED**", "not run", "refused"]
    assert "not yet (" in row and "Qwen2-VL, train: not wired." in page
    assert "- main environment: transformers 5.17.0" in page
    assert "## Refused at load\n\n- None.\n" in page  # Mllama, the last family refused, is served now
    assert "## Not in the matrix yet" in page and "the nearest family.\n\n- None.\n" in page  # every family is built


def test_masks_cross_placeholders_that_expand_into_other_tokens_but_never_change_labels() -> None:
    """Gemma 3 and Idefics3 expand one placeholder into a structure; the labelled tokens must still match one to one."""
    from omniserve.templates.training import LabelError, expand_mask

    text, mask = [1, 5, 2, 3], [0, 0, 1, 1]  # 5: the media placeholder; 2, 3: the assistant's tokens
    assert expand_mask(text, mask, [1, 7, 5, 5, 8, 2, 3], {5}) == [0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(LabelError, match="read the rendered conversation differently"):
        expand_mask(text, mask, [1, 7, 5, 5, 8, 2, 4], {5})  # a labelled token read differently
    with pytest.raises(LabelError, match="read the rendered conversation differently"):
        expand_mask([1, 4, 2, 3], mask, [1, 6, 2, 3], {5})  # a difference with no media anywhere near


def test_models_command_on_a_text_only_causal_lm(tiny_qwen2: Path) -> None:
    from typer.testing import CliRunner

    from omniserve.cli import app

    result = CliRunner().invoke(app, ["models", "--model", str(tiny_qwen2)])
    assert result.exit_code == 0, result.output
    rows = dict(
        line.split(None, 1) for line in result.output.splitlines() if line.split(None, 1)[0] in ("family", "modalities")
    )
    assert rows == {"family": "text-only causal LM (no family module)", "modalities": "text"}
    assert "markers: the template's {% generation %} blocks" in result.output  # omniserve's own tiny template


def test_qwen3_vl_prompts_carry_each_videos_real_frame_times(family_checkpoint: Callable[[str], Path]) -> None:
    """Qwen3-VL writes ``<t seconds>`` before each frame group from the video's metadata; without it the processor
    assumes 24 fps. Frames sampled at 2 fps: groups of two frames start at 0.0 s, 1.0 s, ... (not 0.0, 0.1)."""
    import numpy as np

    from omniserve.media.loader import MediaItem
    from omniserve.media.video import DecodedVideo
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(family_checkpoint("qwen3_vl"))
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    video = DecodedVideo(frames=frames, fps=2.0, timestamps=(0.0, 0.5, 1.0, 1.5), duration=2.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    rendered = renderer.render_chat(messages, [MediaItem("video", video)])
    times = re.findall(r"<([0-9.]+) seconds>", renderer.tokenizer.decode(rendered.token_ids))
    assert [float(t) for t in times] == pytest.approx([0.25, 1.25], abs=0.051)  # written with one decimal
