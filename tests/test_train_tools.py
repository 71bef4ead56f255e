"""Training on conversations with tools: the lines, the labels (calls learned, results never) and parity.

Published template: the tiny Qwen2 with Qwen's Qwen3 template (``tiny_qwen3``: no generation markers,
so the prefix / per-turn strategies). Markers: the tiny Omni, whose template renders tools in the
Hermes format inside its ``{% generation %}`` blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from omniserve.templates.training import IGNORE_INDEX, LabelError
from omniserve.train.data import DataError, read_conversations
from omniserve.train.features import encode_labelled, limits_for
from omniserve.train.parity import check_parity
from tests.test_train_support import write_jsonl

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
RESULT = '{"sky": "overcast"}'


def _call(call_id: str, city: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city})
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


#: user -> call -> result -> answer; then a second question answered by a call of two cities at once.
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("c1", "Paris")]},
    {"role": "tool", "tool_call_id": "c1", "content": RESULT},
    {"role": "assistant", "content": "It is overcast in Paris."},
    {"role": "user", "content": "And in Rome and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("c2", "Rome"), _call("c3", "Oslo")]},
]


def _line(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"messages": messages, **extra}


def _data(tmp_path: Path, *lines: dict[str, Any]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _labelled_text(renderer: Any, sample_labels: list[int]) -> str:
    return renderer.tokenizer.decode([t for t in sample_labels if t != IGNORE_INDEX])


# --------------------------------------------------------------------------- the lines


def test_a_line_with_tools_keeps_them_as_the_server_hands_them_to_the_template(tmp_path: Path) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    data = _data(tmp_path, _line(TOOL_CONVERSATION, tools=[WEATHER], response_format=response_format, id="x"))

    (conversation,) = read_conversations(data)

    assert conversation.tools == (WEATHER,)  # FunctionTool.model_dump(exclude_none=True) of the same dict
    assert conversation.meta == {"id": "x", "response_format": response_format}
    assert conversation.assistant_indices() == [1, 3, 5]


@pytest.mark.parametrize(
    ("extra", "messages", "problem"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, None, "invalid tools: tools[0]"),
        ({"tools": []}, None, "invalid tools"),
        ({"tools": [WEATHER, WEATHER]}, None, "tool names must be unique; 'get_weather' appears twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            None,
            "parameters must be a JSON schema of an object",
        ),
        ({"response_format": {"type": "yaml"}}, None, "invalid response_format"),
        (
            {"tools": [WEATHER]},
            [TOOL_CONVERSATION[0], {"role": "tool", "tool_call_id": "nope", "content": "x"}, TOOL_CONVERSATION[3]],
            "messages[1] answers tool call 'nope', which no earlier assistant message made",
        ),
        (
            {"tools": [WEATHER]},
            [
                TOOL_CONVERSATION[0],
                {
                    "role": "assistant",
                    "tool_calls": [{**_call("c1", "x"), "function": {"name": "f", "arguments": "[]"}}],
                },
            ],
            "arguments must be a JSON object encoded as a string",
        ),
    ],
    ids=["tool-name", "no-tools", "duplicate", "parameters", "response-format", "orphan-result", "arguments"],
)
def test_bad_tool_lines_are_refused_by_file_and_line(
    tmp_path: Path, extra: dict[str, Any], messages: list[dict[str, Any]] | None, problem: str
) -> None:
    good = _line(TOOL_CONVERSATION, tools=[WEATHER])
    data = _data(tmp_path, good, _line(messages or TOOL_CONVERSATION, **extra))

    with pytest.raises(DataError) as info:
        read_conversations(data)

    assert info.value.line == 2
    assert problem in info.value.message, info.value.message


# --------------------------------------------------------------------------- labels and parity


def _renderer(model: Path) -> Any:
    from omniserve.templates.render import PromptRenderer

    return PromptRenderer.from_pretrained(model)


@pytest.mark.parametrize(
    ("strategy", "turns", "used"),
    [
        # Qwen3 drops the <think> block of turns before the last user query: auto goes per turn
        ("auto", 6, "per-turn"),
        ("per-turn", 6, "per-turn"),
        # a lone call: one sequence, its labels after the served prompt
        ("prefix", 2, "prefix"),
        ("auto", 2, "prefix"),
    ],
)
def test_published_template_learns_the_calls_and_never_the_results(
    tiny_qwen3: Path, tmp_path: Path, strategy: str, turns: int, used: str
) -> None:
    renderer = _renderer(tiny_qwen3)
    data = _data(tmp_path, _line(TOOL_CONVERSATION[:turns], tools=[WEATHER]))
    (conversation,) = read_conversations(data)

    labelled = encode_labelled(renderer, conversation, limits_for(data), strategy=strategy)  # type: ignore[arg-type]

    assert labelled.strategy == used
    learned = "".join(_labelled_text(renderer, s.labels) for s in labelled.samples)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in learned
    if turns > 2:
        assert "It is overcast in Paris.<|im_end|>" in learned
        assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>' in learned
    assert "tool_response" not in learned and "sky" not in learned  # the result is input
    assert "description" not in learned  # the tool list is input
    whole = renderer.tokenizer.decode(labelled.samples[-1].input_ids)
    assert '"description": "The weather in a city."' in whole  # the tools are in the prompt trained on

    report = check_parity(renderer, [conversation], limits_for(data), strategy=strategy)  # type: ignore[arg-type]
    assert report.ok, "\n".join(str(d) for d in report.differences)
    assert report.turns == turns // 2 and report.strategies == {used: 1}


def test_prefix_refuses_a_tool_conversation_whose_template_rewrites_earlier_turns(
    tiny_qwen3: Path, tmp_path: Path
) -> None:
    renderer = _renderer(tiny_qwen3)
    data = _data(tmp_path, _line(TOOL_CONVERSATION, tools=[WEATHER]))
    (conversation,) = read_conversations(data)

    with pytest.raises(DataError, match=r"messages\[1\]: the chat template renders the conversation .* rewrites"):
        encode_labelled(renderer, conversation, limits_for(data), strategy="prefix")


def test_markers_template_learns_the_calls_and_never_the_results(tiny_omni: Path, tmp_path: Path) -> None:
    renderer = _renderer(tiny_omni)
    data = _data(tmp_path, _line(TOOL_CONVERSATION, tools=[WEATHER]))
    (conversation,) = read_conversations(data)

    labelled = encode_labelled(renderer, conversation, limits_for(data))

    assert labelled.strategy == "markers"
    (sample,) = labelled.samples
    assert _labelled_text(renderer, sample.labels) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is overcast in Paris.<|im_end|>"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    )
    report = check_parity(renderer, [conversation], limits_for(data))
    assert report.ok and report.strategies == {"markers": 1}, "\n".join(str(d) for d in report.differences)


def test_the_same_line_without_its_tools_is_a_different_prompt(tiny_qwen3: Path, tmp_path: Path) -> None:
    """The tools reach the template: dropping them from the line changes what is trained on."""
    renderer = _renderer(tiny_qwen3)
    with_tools = _data(tmp_path, _line(TOOL_CONVERSATION, tools=[WEATHER]))
    (conversation,) = read_conversations(with_tools)
    bare = read_conversations(write_jsonl(tmp_path / "bare.jsonl", [TOOL_CONVERSATION]))[0]

    a = encode_labelled(renderer, conversation, limits_for(with_tools)).samples[-1].input_ids
    b = encode_labelled(renderer, bare, limits_for(with_tools)).samples[-1].input_ids

    assert len(a) > len(b) + 20


def test_tools_on_a_template_that_does_not_render_them_are_refused(tiny_qwen2: Path, tmp_path: Path) -> None:
    renderer = _renderer(tiny_qwen2)
    data = _data(tmp_path, _line(TOOL_CONVERSATION[:4], tools=[WEATHER]))
    (conversation,) = read_conversations(data)

    with pytest.raises(DataError, match="does not render tools") as info:
        encode_labelled(renderer, conversation, limits_for(data))
    assert isinstance(info.value.__context__, LabelError) or info.value.line == 1
