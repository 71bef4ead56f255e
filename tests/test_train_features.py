"""Training features: labels on every assistant turn and nothing else; bad input named by file and line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from omniserve.templates.training import IGNORE_INDEX, LabelError, expand_mask, render_training_example
from omniserve.train.data import DataError, read_conversations
from omniserve.train.features import encode_all, limits_for, load_messages
from tests.test_train_support import MIXED_CONVERSATIONS, image_part, run_cli, text, write_jsonl, write_media


@pytest.fixture(scope="module")
def renderer(tiny_omni: Path):  # type: ignore[no-untyped-def]
    from omniserve.templates.render import PromptRenderer

    return PromptRenderer.from_pretrained(tiny_omni)


def _label_spans(labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if i == 0 or labels[i - 1] == IGNORE_INDEX:
            spans.append([])
        spans[-1].append(label)
    return spans


def test_multi_turn_labels_cover_every_assistant_turn_and_nothing_else(renderer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_media(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [MIXED_CONVERSATIONS["multi-turn-media"]])
    conversation = read_conversations(data)[0]
    messages, media = asyncio.run(load_messages(conversation, conversation.messages, limits_for(data)))

    example = render_training_example(renderer, messages, media)

    decoded = [renderer.tokenizer.decode(span) for span in _label_spans(example.labels)]
    assert decoded == ["red<|im_end|>", "a low tone<|im_end|>"]
    # the ids are exactly what the server renders for the whole conversation
    served = renderer.render_chat(messages, media, add_generation_prompt=False)
    assert example.input_ids == served.token_ids
    # every media placeholder token (expanded by the processor) is ignored
    image_id = renderer.tokenizer.convert_tokens_to_ids("<|IMAGE|>")
    audio_id = renderer.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    media_positions = [i for i, t in enumerate(example.input_ids) if t in (image_id, audio_id)]
    assert len(media_positions) > 4
    assert all(example.labels[i] == IGNORE_INDEX for i in media_positions)


def test_text_only_model_labels_both_turns(tiny_qwen2: Path, tmp_path: Path) -> None:
    from omniserve.templates.render import PromptRenderer

    data = write_jsonl(tmp_path / "d.jsonl", [MIXED_CONVERSATIONS["text+system+multi-turn"]])
    renderer = PromptRenderer.from_pretrained(tiny_qwen2)
    encoded = encode_all(renderer, read_conversations(data), limits_for(data))

    sample = encoded.samples[0]
    assert [renderer.tokenizer.decode(s) for s in _label_spans(sample.labels)] == ["red<|im_end|>", "blue<|im_end|>"]


def test_expand_mask_follows_media_runs_and_refuses_disagreeing_readings() -> None:
    media = {9}
    assert expand_mask([1, 9, 2, 3], [0, 0, 1, 1], [1, 9, 9, 9, 2, 3], media) == [0, 0, 0, 0, 1, 1]
    with pytest.raises(LabelError, match="read the rendered conversation differently"):
        expand_mask([1, 9, 2, 3], [0, 0, 1, 1], [1, 9, 9, 4, 3], media)
    with pytest.raises(LabelError, match="media inside an assistant turn"):
        expand_mask([1, 9, 2], [0, 1, 1], [1, 9, 9, 2], media)


def test_markers_asked_for_on_a_template_without_them_is_refused(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Without markers the prefix strategy is used (tests/test_prefix_masks.py); asking for markers is refused."""
    import json
    import shutil

    model = tmp_path / "no-markers"
    shutil.copytree(tiny_qwen2, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template_file = model / "chat_template.jinja"
    template = template_file.read_text() if template_file.exists() else config["chat_template"]
    template = template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    if template_file.exists():
        template_file.write_text(template)
    else:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "d.jsonl", [MIXED_CONVERSATIONS["text"]])

    result = run_cli("check-parity", "--model", model, "--data", data, "--mask-strategy", "markers")

    assert result.exit_code == 2
    assert "{% generation %}" in result.output
    assert run_cli("check-parity", "--model", model, "--data", data).exit_code == 0


# --------------------------------------------------------------------------- bad input, by file and line

GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "malformed JSON"),
        ('["a list"]', 'expected a JSON object with a "messages" list'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "invalid messages: messages[0]"),
        ('{"messages": [{"role": "user", "content": "no answer"}]}', "no assistant turn"),
    ],
)
def test_malformed_lines_are_named_by_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(f"{GOOD}\n\n{line}\n")

    with pytest.raises(DataError) as error:
        read_conversations(data)

    assert str(error.value).startswith(f"{data}:3: ")
    assert message in str(error.value)


def test_missing_and_undecodable_media_are_named_by_file_line_and_part(renderer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            [
                {"role": "user", "content": [image_part("missing.png"), text("?")]},
                {"role": "assistant", "content": "x"},
            ],
            [{"role": "user", "content": [text("?"), image_part("broken.png")]}, {"role": "assistant", "content": "x"}],
        ],
    )
    conversations = read_conversations(data)

    with pytest.raises(DataError, match=r"d\.jsonl:1: messages\[0\]\.content\[0\]: .*does not exist"):
        encode_all(renderer, conversations[:1], limits_for(data))
    with pytest.raises(DataError, match=r"d\.jsonl:2: messages\[0\]\.content\[1\]: "):
        encode_all(renderer, conversations[1:], limits_for(data))


def test_media_outside_the_data_folder_is_refused(renderer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = write_jsonl(
        tmp_path / "sub" / "d.jsonl",
        [[{"role": "user", "content": [image_part("../../etc/passwd")]}, {"role": "assistant", "content": "x"}]],
    )
    with pytest.raises(DataError, match="outside the allowed local media directory"):
        encode_all(renderer, read_conversations(data), limits_for(data))


def test_too_long_samples_are_skipped_with_their_lines_or_fail_on_request(renderer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    long_answer = " ".join(["word"] * 200)
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            MIXED_CONVERSATIONS["text"],
            [{"role": "user", "content": "talk"}, {"role": "assistant", "content": long_answer}],
            MIXED_CONVERSATIONS["text"],
        ],
    )
    conversations = read_conversations(data)

    skipped = encode_all(renderer, conversations, limits_for(data), max_length=64, too_long="skip")
    assert [s.line for s in skipped.samples] == [1, 3]
    assert skipped.skipped_too_long == [2]
    with pytest.raises(DataError, match=r"d\.jsonl:2: the conversation has \d+ tokens, more than --max-length 64"):
        encode_all(renderer, conversations, limits_for(data), max_length=64, too_long="fail")


def test_train_cli_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD + "\n")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")

    result = run_cli("train", "--model", tmp_path / "not-a-model", "--data", data, "--output", tmp_path / "out")

    assert result.exit_code == 2
    assert "not-a-model is not a model folder (no config.json)" in result.output
    assert not (tmp_path / "out").exists()


def test_train_cli_names_the_bad_line(tiny_omni: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')

    result = run_cli("train", "--model", tiny_omni, "--data", data, "--output", tmp_path / "out")

    assert result.exit_code == 2
    assert f"{data}:2: the conversation has no assistant turn" in result.output
