"""Assistant masks for chat templates without ``{% generation %}`` markers (what publishers ship).

The tiny checkpoints get the published Qwen2-VL, Qwen2.5-Omni and Qwen3 templates swapped in
(``tests/fixtures/chat_templates``). Everything runs the real renderer, processor, media loader,
trainer and command line; labels are checked against text the tests write out by hand.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from omniserve.models.families import get as get_family
from omniserve.templates.render import PromptRenderer, RenderedPrompt
from omniserve.templates.training import (
    IGNORE_INDEX,
    LabelError,
    LabelledConversation,
    MaskStrategy,
    render_training_examples,
)
from omniserve.train.data import DataError, read_conversations
from omniserve.train.features import encode_all, limits_for, load_messages
from omniserve.train.options import TrainOptions
from omniserve.train.sft import run_training
from tests.test_train_support import (
    MIXED_CONVERSATIONS,
    image_part,
    published_template,
    run_cli,
    text,
    video_part,
    with_chat_template,
    write_jsonl,
    write_media,
)
from tests.test_train_tools import TOOL_CONVERSATION

ROOT = Path(__file__).resolve().parents[1]

IMAGE_THEN_VIDEO = [
    {"role": "user", "content": [image_part("media/red.png"), text("What colour is this?")]},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": [video_part("media/clip.mp4"), text("Which way does it move?")]},
    {"role": "assistant", "content": "right"},
]
REASONING = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "<think>\nA primary one.\n</think>\n\nred"},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "<think>\nNot red.\n</think>\n\nblue"},
]
# A template whose generation prompt opens the answer with text the rendered turn does not have.
SKEWED_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\nAnswer: ' -}}{%- endif -%}"
)
# LLaVA-OneVision's habit on a text-only model: a past turn's header is `assistant \n`, the generation
# prompt's `assistant\n`; tool calls written after the content. HEADER_FOR_CALLS: a turn of calls gets its own header.
WHITESPACE_TOOLS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + HEADER_FOR_CALLS + ' \\n' + (message['content'] or '') -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '<tool_call>' + call.function.name + ' ' + (call.function.arguments | tojson) + '</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# A template with no stop token at the end of a turn: only blank lines separate the turns.
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}{{- message['role'] + ': ' + message['content'] + '\\n\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant:' -}}{%- endif -%}"
)

#: How training and check-parity name the served-prompt strategy in their summary line.
SERVED_PROMPT = "served-prompt examples (each turn on the exact prompt the server sends for it)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Media files for the conversations (paths in them are relative to this folder)."""
    path = tmp_path_factory.mktemp("prefix-masks")
    write_media(path)
    return path


@pytest.fixture(scope="module")
def qwen2_vl_published(tiny_qwen2_vl: Path, folder: Path) -> Path:
    return with_chat_template(tiny_qwen2_vl, folder / "qwen2-vl-published", published_template("qwen2_vl"))


@pytest.fixture(scope="module")
def omni_published(tiny_omni: Path, folder: Path) -> Path:
    return with_chat_template(tiny_omni, folder / "omni-published", published_template("qwen2_5_omni"))


@pytest.fixture(scope="module")
def llava_onevision(folder: Path) -> Path:
    """The LLaVA-OneVision family's tiny checkpoint with its published template."""
    return get_family("llava_onevision").build(folder / "llava-onevision", published_template("llava_onevision"))


@pytest.fixture(scope="module")
def qwen3_template(tiny_qwen2: Path, folder: Path) -> Path:
    return with_chat_template(tiny_qwen2, folder / "qwen3-template", published_template("qwen3"))


def _encode(
    renderer: PromptRenderer,
    folder: Path,
    messages: list[dict[str, Any]],
    strategy: MaskStrategy = "auto",
) -> tuple[LabelledConversation, list[RenderedPrompt]]:
    """The conversation's training examples, and the prompt the server builds for each assistant turn.

    Both go through the serving path's first half (protocol validation, ``to_hf_messages``,
    ``load_media``); the served prompts then through ``render_chat`` with the generation prompt.
    """
    data = write_jsonl(folder / "one.jsonl", [messages])
    conversation = read_conversations(data)[0]
    limits = limits_for(data)
    hf_messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits))
    labelled = render_training_examples(renderer, hf_messages, media, strategy=strategy)
    served = []
    for index in conversation.assistant_indices():
        before, before_media = asyncio.run(load_messages(conversation, conversation.messages[:index], limits))
        served.append(renderer.render_chat(before, before_media, add_generation_prompt=True))
    return labelled, served


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every run of learned tokens."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _learned_text(renderer: PromptRenderer, labels: list[int]) -> list[str]:
    return [renderer.tokenizer.decode(labels[a:b]) for a, b in _spans(labels)]


def _assert_each_turn_is_learned_right_after_its_served_prompt(
    renderer: PromptRenderer, labelled: LabelledConversation, served: list[RenderedPrompt]
) -> None:
    """Parity, turn by turn: the served ids open the training ids and the turn's labels start where they end."""
    turns = [(example, start) for example in labelled.examples for start, _ in _spans(example.labels)]
    assert len(turns) == len(served)
    newline = renderer.tokenizer("\n", add_special_tokens=False)["input_ids"]
    for (example, start), prompt in zip(turns, served, strict=True):
        assert example.input_ids[: prompt.num_tokens] == prompt.token_ids
        assert start == prompt.num_tokens
    for example in labelled.examples:
        for _, end in _spans(example.labels):
            # the turn ends with the end-of-turn token; the newline the template writes after it is not learned
            assert renderer.tokenizer.convert_ids_to_tokens(example.input_ids[end - 1]) == "<|im_end|>"
            if end < len(example.input_ids):
                assert example.input_ids[end : end + len(newline)] == newline
                assert example.labels[end] == IGNORE_INDEX


def test_qwen2_vl_published_template_learns_each_answer_and_its_end_of_turn_only(
    qwen2_vl_published: Path, folder: Path
) -> None:
    renderer = PromptRenderer.from_pretrained(qwen2_vl_published)
    labelled, served = _encode(renderer, folder, IMAGE_THEN_VIDEO)

    assert labelled.strategy == "prefix" and len(labelled.examples) == 1
    example = labelled.examples[0]
    assert example.turns == [1, 3]
    assert _learned_text(renderer, example.labels) == ["red<|im_end|>", "right<|im_end|>"]
    _assert_each_turn_is_learned_right_after_its_served_prompt(renderer, labelled, served)
    # the template's default system prompt is in the input and never learned
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert example.text is not None and example.text.startswith(system)
    system_tokens = len(renderer.tokenizer(system, add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in example.labels[: system_tokens + 1])
    # the ids are the served rendering of the whole conversation, media expanded by the processor
    pad, video = (renderer.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    assert example.input_ids.count(pad) > 1 and example.input_ids.count(video) > 1
    pairs = zip(example.input_ids, example.labels, strict=True)
    media_labels = [label for token, label in pairs if token in (pad, video)]
    assert set(media_labels) == {IGNORE_INDEX}
    assert {"pixel_values", "pixel_values_videos"} <= example.mm_inputs.keys()


@pytest.mark.parametrize("name", ["mixed+system", "multi-turn-media", "video+developer", "audio-inline"])
def test_qwen2_5_omni_published_template_masks_image_video_and_audio_conversations(
    omni_published: Path, folder: Path, name: str
) -> None:
    renderer = PromptRenderer.from_pretrained(omni_published)
    messages = MIXED_CONVERSATIONS[name]
    labelled, served = _encode(renderer, folder, messages)

    assert labelled.strategy == "prefix" and len(labelled.examples) == 1
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _learned_text(renderer, labelled.examples[0].labels) == [f"{a}<|im_end|>" for a in answers]
    _assert_each_turn_is_learned_right_after_its_served_prompt(renderer, labelled, served)
    has_system = messages[0]["role"] in ("system", "developer")
    assert ("You are a helpful assistant." in (labelled.examples[0].text or "")) is not has_system


def test_a_template_that_drops_earlier_reasoning_gets_per_turn_examples_and_says_so(
    qwen3_template: Path, folder: Path
) -> None:
    renderer = PromptRenderer.from_pretrained(qwen3_template)
    labelled, served = _encode(renderer, folder, REASONING)

    assert labelled.strategy == "per-turn"
    assert [e.turns for e in labelled.examples] == [[2], [4]]
    first, second = labelled.examples
    assert _learned_text(renderer, first.labels) == ["<think>\nA primary one.\n</think>\n\nred<|im_end|>"]
    assert _learned_text(renderer, second.labels) == ["<think>\nNot red.\n</think>\n\nblue<|im_end|>"]
    # the second turn is trained after the history the server sends: the first answer without its reasoning
    assert second.text is not None and "<|im_start|>assistant\nred<|im_end|>\n" in second.text
    assert "A primary one." not in second.text
    _assert_each_turn_is_learned_right_after_its_served_prompt(renderer, labelled, served)

    # asked for one sequence per conversation, the template is refused where it rewrites the first turn
    with pytest.raises(LabelError) as refused:
        render_training_examples(renderer, *_hf(folder, REASONING), strategy="prefix")
    message = str(refused.value)
    assert message.startswith("assistant turn messages[2]: the chat template renders the conversation through")
    assert "(it rewrites earlier turns)" in message
    assert f"first difference at token {served[0].num_tokens}: through this turn '<'" in message
    assert "vs whole conversation 'red'" in message

    # training reports the strategy
    data = write_jsonl(folder / "reasoning.jsonl", [REASONING, MIXED_CONVERSATIONS["text"]])
    encoded = encode_all(renderer, read_conversations(data), limits_for(data))
    assert encoded.strategies == {"per-turn": 1, "prefix": 1}
    assert [s.turns for s in encoded.samples] == [(2,), (4,), (1,)]
    assert "per-turn examples (the template rewrites earlier turns) (1 conversation)" in encoded.describe_strategies()


def _hf(folder: Path, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    data = write_jsonl(folder / "hf.jsonl", [messages])
    conversation = read_conversations(data)[0]
    return asyncio.run(load_messages(conversation, conversation.messages, limits_for(data)))


def test_a_generation_prompt_that_is_not_a_token_prefix_is_refused_with_the_turn_and_tokens(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    model = with_chat_template(tiny_qwen2, tmp_path / "skewed", SKEWED_TEMPLATE)
    data = write_jsonl(tmp_path / "d.jsonl", [MIXED_CONVERSATIONS["text+system+multi-turn"]])
    # what the template writes, spelled out: the served prompt for messages[2] and the text trained for it
    renderer = PromptRenderer.from_pretrained(model)
    tokenizer = renderer.tokenizer
    before = "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
    served = tokenizer(before + "<|im_start|>assistant\nAnswer: ", add_special_tokens=False)["input_ids"]
    trained = tokenizer(before + "<|im_start|>assistant\nred<|im_end|>\n", add_special_tokens=False)["input_ids"]
    position = next(i for i, (a, b) in enumerate(zip(served, trained, strict=False)) if a != b)

    result = run_cli("check-parity", "--model", model, "--data", data)

    assert result.exit_code == 2
    assert f"{data}:1: assistant turn messages[2]: the prompt the server sends for this turn is not a token" in (
        result.output
    )
    assert (
        f"first difference at token {position}: served {tokenizer.decode([served[position]])!r} "
        f"(id {served[position]}) vs trained {tokenizer.decode([trained[position]])!r} (id {trained[position]})"
    ) in result.output
    assert "mask strategy served-prompt trains each turn after exactly the prompt the server sends" in result.output
    # no rendering of the conversation can train that turn
    with pytest.raises(DataError, match=r"messages\[2\]: the prompt the server sends"):
        encode_all(renderer, read_conversations(data), limits_for(data), strategy="per-turn")

    # served-prompt, asked for, trains it after "Answer: ", which the history never shows
    chosen = run_cli("check-parity", "--model", model, "--data", data, "--mask-strategy", "served-prompt")
    assert chosen.exit_code == 0, chosen.output
    assert f"{SERVED_PROMPT} (1 conversation)" in chosen.output
    encoded = encode_all(renderer, read_conversations(data), limits_for(data), strategy="served-prompt")
    first = encoded.samples[0]
    answer = tokenizer("red", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert list(first.input_ids) == served + answer
    assert list(first.labels) == [IGNORE_INDEX] * len(served) + answer


def test_llava_onevision_trains_each_turn_after_exactly_the_prompt_the_server_sends(
    llava_onevision: Path, folder: Path
) -> None:
    """Its history writes `<|im_start|>assistant \\n<text>`, its generation prompt `<|im_start|>assistant\\n`."""
    import torch

    renderer = PromptRenderer.from_pretrained(llava_onevision)
    labelled, served = _encode(renderer, folder, IMAGE_THEN_VIDEO)

    assert labelled.strategy == "served-prompt"
    assert [e.turns for e in labelled.examples] == [[1], [3]]
    stop = renderer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example, prompt, answer in zip(labelled.examples, served, ["red", "right"], strict=True):
        n = prompt.num_tokens
        assert prompt.text is not None and prompt.text.endswith("<|im_start|>assistant\n")
        assert example.input_ids[:n] == prompt.token_ids  # the served ids, media expanded, token for token
        assert example.input_ids[n:] == [*renderer.tokenizer(answer, add_special_tokens=False)["input_ids"], stop]
        assert example.labels == [IGNORE_INDEX] * n + example.input_ids[n:]  # the answer and its stop token only
        assert example.text == prompt.text + f"{answer}<|im_end|>"
        assert prompt.mm_inputs and prompt.mm_inputs.keys() == example.mm_inputs.keys()
        assert all(torch.equal(example.mm_inputs[k], v) for k, v in prompt.mm_inputs.items())
    _assert_each_turn_is_learned_right_after_its_served_prompt(renderer, labelled, served)
    # the second turn sees the first as the template writes it in the history, as serving shows it
    assert "<|im_start|>assistant \nred<|im_end|><|im_start|>user " in (labelled.examples[1].text or "")

    # no rendering of the conversation carries the labels: prefix refuses, markers train after the history's header
    with pytest.raises(LabelError, match=r"^assistant turn messages\[1\]: the prompt the server sends"):
        render_training_examples(renderer, *_hf(folder, IMAGE_THEN_VIDEO), strategy="prefix")
    markers, _ = _encode(renderer, folder, IMAGE_THEN_VIDEO, strategy="markers")
    assert markers.examples[0].input_ids[: served[0].num_tokens] != served[0].token_ids

    # check-parity uses the same masks (the train and LoRA cells of tests/test_families.py train with them)
    data = write_jsonl(folder / "llava-ov.jsonl", [IMAGE_THEN_VIDEO, MIXED_CONVERSATIONS["text+system+multi-turn"]])
    checked = run_cli("check-parity", "--model", llava_onevision, "--data", data)
    assert checked.exit_code == 0, checked.output
    assert f"{SERVED_PROMPT} (2 conversations)" in checked.output and "4 assistant turns" in checked.output


def test_served_prompt_gives_per_turn_tokens_labels_and_per_token_inputs_where_the_template_allows_both(
    qwen2_vl_published: Path, folder: Path
) -> None:
    """On a template whose served prompts are prefixes, the processor's own reading of each whole turn agrees."""
    import torch

    renderer = PromptRenderer.from_pretrained(qwen2_vl_published)
    served_prompt, _ = _encode(renderer, folder, IMAGE_THEN_VIDEO, strategy="served-prompt")
    per_turn, _ = _encode(renderer, folder, IMAGE_THEN_VIDEO, strategy="per-turn")

    assert served_prompt.strategy == "served-prompt" and len(served_prompt.examples) == len(per_turn.examples) == 2
    for ours, theirs in zip(served_prompt.examples, per_turn.examples, strict=True):
        n = len(ours.input_ids)
        assert ours.input_ids == theirs.input_ids[:n] and ours.labels == theirs.labels[:n]
        assert set(theirs.labels[n:]) == {IGNORE_INDEX}  # only the newline after the stop token is left
        assert "mm_token_type_ids" in ours.mm_inputs
        for key, value in ours.mm_inputs.items():
            expected = theirs.mm_inputs[key][..., :n] if key == "mm_token_type_ids" else theirs.mm_inputs[key]
            assert torch.equal(value, expected), key


def test_served_prompt_examples_start_with_the_generation_prompt_not_the_historys_header(
    llava_onevision: Path, folder: Path
) -> None:
    """Spelled out by hand: a served prompt taken from the history rendering would end `assistant \\n`."""
    renderer = PromptRenderer.from_pretrained(llava_onevision)
    labelled, _ = _encode(renderer, folder, MIXED_CONVERSATIONS["text+system+multi-turn"])
    history = (
        "<|im_start|>system \nAnswer briefly.<|im_end|><|im_start|>user \nName a colour.<|im_end|>"
        "<|im_start|>assistant \nred<|im_end|><|im_start|>user \nAnother one?<|im_end|>"
    )

    def ids(text: str) -> list[int]:
        return list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])

    stop = renderer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    served, from_history = ids(history + "<|im_start|>assistant\n"), ids(history + "<|im_start|>assistant \n")
    assert served != from_history
    example = labelled.examples[1]
    assert example.input_ids == [*served, *ids("blue"), stop]
    assert example.labels == [IGNORE_INDEX] * len(served) + [*ids("blue"), stop]


def test_served_prompt_learns_tool_calls_as_the_template_writes_them_or_refuses_the_turn(
    tiny_qwen2: Path, llava_onevision: Path, tmp_path: Path
) -> None:
    model = with_chat_template(
        tiny_qwen2, tmp_path / "tools", WHITESPACE_TOOLS_TEMPLATE.replace("HEADER_FOR_CALLS", "''")
    )
    renderer = PromptRenderer.from_pretrained(model)
    labelled, served = _encode(renderer, tmp_path, TOOL_CONVERSATION)

    assert labelled.strategy == "served-prompt"  # auto: the served prompts differ from the history in whitespace only
    assert [e.turns for e in labelled.examples] == [[1], [3], [5]]
    assert [_learned_text(renderer, e.labels) for e in labelled.examples] == [
        ['<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>'],
        ["It is overcast in Paris.<|im_end|>"],
        ['<tool_call>get_weather {"city": "Rome"}</tool_call><tool_call>get_weather {"city": "Oslo"}</tool_call>'
         "<|im_end|>"],
    ]  # fmt: skip
    _assert_each_turn_is_learned_right_after_its_served_prompt(renderer, labelled, served)

    # a template that writes a turn of calls under another header: how the model writes the calls is not known
    odd = with_chat_template(
        tiny_qwen2,
        tmp_path / "odd",
        WHITESPACE_TOOLS_TEMPLATE.replace("HEADER_FOR_CALLS", "(' calls' if message.tool_calls else '')"),
    )
    with pytest.raises(LabelError) as refused:
        _encode(PromptRenderer.from_pretrained(odd), tmp_path, TOOL_CONVERSATION)
    assert str(refused.value).startswith(
        "assistant turn messages[1]: mask strategy served-prompt cannot find how the chat template writes this "
        "turn's tool calls"
    )
    # LLaVA-OneVision's template writes no tool calls at all: the turn would teach an empty answer
    with pytest.raises(LabelError) as unwritten:
        _encode(PromptRenderer.from_pretrained(llava_onevision), tmp_path, TOOL_CONVERSATION)
    assert str(unwritten.value) == (
        "assistant turn messages[1]: the chat template does not write this turn's tool calls (get_weather missing "
        "from its rendering), so mask strategy served-prompt cannot teach them"
    )


def test_turns_without_a_stop_token_learn_their_text_but_not_the_blank_line_after_it(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    model = with_chat_template(tiny_qwen2, tmp_path / "plain", PLAIN_TEMPLATE)
    renderer = PromptRenderer.from_pretrained(model)
    labelled, served = _encode(renderer, tmp_path, MIXED_CONVERSATIONS["text+system+multi-turn"])

    assert labelled.strategy == "prefix"
    assert _learned_text(renderer, labelled.examples[0].labels) == [" red", " blue"]
    starts = [start for start, _ in _spans(labelled.examples[0].labels)]
    assert starts == [p.num_tokens for p in served]


def test_markers_still_win_over_prefix_renderings_on_the_tiny_models(tiny_omni: Path, folder: Path) -> None:
    renderer = PromptRenderer.from_pretrained(tiny_omni)
    labelled, _ = _encode(renderer, folder, MIXED_CONVERSATIONS["multi-turn-media"])

    assert labelled.strategy == "markers"
    assert _learned_text(renderer, labelled.examples[0].labels) == ["red<|im_end|>", "a low tone<|im_end|>"]
    # the prefix strategy finds exactly the tokens the markers mark
    prefix, _ = _encode(renderer, folder, MIXED_CONVERSATIONS["multi-turn-media"], strategy="prefix")
    assert prefix.examples[0].labels == labelled.examples[0].labels
    assert prefix.examples[0].input_ids == labelled.examples[0].input_ids


def test_check_parity_command_passes_on_the_published_template_checkpoints(
    omni_published: Path, qwen2_vl_published: Path, qwen3_template: Path, folder: Path
) -> None:
    every_modality = write_jsonl(folder / "all.jsonl", list(MIXED_CONVERSATIONS.values()))
    command = Path(sys.executable).with_name("omniserve")
    launcher = [str(command)] if command.exists() else [sys.executable, "-m", "omniserve.train"]

    result = subprocess.run(
        [*launcher, "check-parity", "--model", str(omni_published), "--data", str(every_modality)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(MIXED_CONVERSATIONS)} conversations" in result.stdout
    assert "token-identical" in result.stdout
    # the vision model (no audio) and the reasoning template, in process
    vision = write_jsonl(
        folder / "vision.jsonl",
        [IMAGE_THEN_VIDEO, *(MIXED_CONVERSATIONS[n] for n in ("image-data-url", "video+developer", "text"))],
    )
    assert run_cli("check-parity", "--model", qwen2_vl_published, "--data", vision).exit_code == 0
    reasoning = write_jsonl(folder / "reasoning-parity.jsonl", [REASONING, MIXED_CONVERSATIONS["text"]])
    checked = run_cli("check-parity", "--model", qwen3_template, "--data", reasoning)
    assert checked.exit_code == 0, checked.output
    assert "3 assistant turns" in checked.output


def test_train_runs_two_steps_on_published_templates_full_and_lora(
    qwen2_vl_published: Path,
    omni_published: Path,
    qwen3_template: Path,
    folder: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    vision = write_jsonl(
        folder / "train-vision.jsonl",
        [IMAGE_THEN_VIDEO, *(MIXED_CONVERSATIONS[n] for n in ("text", "image", "video+developer"))],
    )
    options = TrainOptions(model=qwen2_vl_published, data=vision, output=tmp_path / "full", max_steps=2, batch_size=2)

    full = run_training(options.model_copy(update={"progress": False}))

    assert full.global_step == 2 and len(full.losses) == 2
    assert full.label_strategies == {"prefix": 4}
    assert full.describe_labels() == "assistant labels: prefix renderings (4 conversations)"

    omni_data = write_jsonl(
        folder / "train-omni.jsonl", [MIXED_CONVERSATIONS[n] for n in ("text", "audio-file", "multi-turn-media")]
    )
    lora = run_cli(
        "train", "--model", omni_published, "--data", omni_data, "--output", tmp_path / "lora",
        "--lora", "--lora-rank", "4", "--max-steps", "2", "--batch-size", "2", "--no-progress",
    )  # fmt: skip
    assert lora.exit_code == 0, lora.output
    assert "2 steps" in lora.output
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()

    # per-turn: one sample per assistant turn, and the run says so
    reasoning = write_jsonl(folder / "train-reasoning.jsonl", [REASONING, MIXED_CONVERSATIONS["text"]])
    with caplog.at_level(logging.WARNING, logger="omniserve.train.sft"):
        per_turn = run_training(
            TrainOptions(model=qwen3_template, data=reasoning, output=tmp_path / "q3", max_steps=2, progress=False)
        )
    assert per_turn.label_strategies == {"per-turn": 1, "prefix": 1}
    assert per_turn.num_samples == 3
    assert "2 conversations gave 3 samples" in caplog.text and "per-turn examples" in caplog.text


def test_packed_qwen2_vl_rows_give_each_sample_its_unpacked_loss(qwen2_vl_published: Path, folder: Path) -> None:
    """Qwen2-VL's per-token ``mm_token_type_ids`` travel with their tokens when samples are padded or packed."""
    from omniserve.train.collate import PackingCollator, PaddingCollator, PositionPlanner
    from tests.test_train_packing import _alone, _generating_module, _per_sample_losses

    data = write_jsonl(
        folder / "pack.jsonl",
        [IMAGE_THEN_VIDEO, *(MIXED_CONVERSATIONS[n] for n in ("text", "image", "video+developer"))],
    )
    samples = encode_all(PromptRenderer.from_pretrained(qwen2_vl_published), read_conversations(data), limits_for(data))
    module = _generating_module(qwen2_vl_published)
    packs = [samples.samples[:2], samples.samples[2:]]

    packed = PackingCollator(0, PositionPlanner.for_model(module))(packs)
    padded = PaddingCollator(0)(samples.samples)

    assert packed["mm_token_type_ids"].shape == packed["input_ids"].shape
    assert padded["mm_token_type_ids"].shape == padded["input_ids"].shape
    alone = [_alone(module, s) for s in samples.samples]
    assert _per_sample_losses(module, packed, [[len(s) for s in p] for p in packs]) == pytest.approx(alone, abs=2e-5)
