"""Tool calling in the Hermes/Qwen format: the tools and the call history rendered by the checkpoint's own
template (the published Qwen3 one swapped into the tiny text model), the parser on model-like replies,
the OpenAI shapes the official ``openai`` client reads, streamed and not, and what is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from omniserve.tools.base import ArgumentsPiece, CallStart, ParsedCall, TextPiece
from omniserve.tools.hermes import HermesParser
from omniserve.tools.registry import parser_class, require_parser
from tests.conftest import RunningServer, start_server
from tests.scripted_engine import Script, scripted_engine
from tests.test_train_support import published_template

MODEL = "tiny-qwen3"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


# ---------------------------------------------------------------- the parser, on replies as Qwen writes them


def _merged(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if out and isinstance(event, TextPiece) and isinstance(out[-1], TextPiece):
            out[-1] = TextPiece(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def _streamed(text: str, size: int) -> list[Any]:
    parser = HermesParser()
    events = [e for i in range(0, len(text), size) for e in parser.feed(text[i : i + size])]
    return _merged(events + parser.finish())


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (CALL, [ParsedCall("get_weather", '{"city": "Paris"}')]),
        (
            CALL + "\n" + CALL_TIME,
            [ParsedCall("get_weather", '{"city": "Paris"}'), ParsedCall("get_time", "{}")],
        ),
        (
            "Let me look that up.\n\n" + CALL,
            [TextPiece("Let me look that up."), ParsedCall("get_weather", '{"city": "Paris"}')],
        ),
        (  # a missing brace: the block stays the text the model wrote
            'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
            [TextPiece('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>')],
        ),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', [TextPiece('<tool_call>\n{"arguments": {}}\n</tool_call>')]),
        ('cut off <tool_call>\n{"name": "get_w', [TextPiece('cut off <tool_call>\n{"name": "get_w')]),
        ("no calls, a < b and <tool\n", [TextPiece("no calls, a < b and <tool\n")]),
    ],
    ids=["one call", "two parallel calls", "text then call", "broken json", "no name", "unfinished", "plain text"],
)
def test_hermes_parser_whole_and_streamed_agree(reply: str, expected: list[Any]) -> None:
    assert _merged(HermesParser().parse_all(reply)) == expected
    for size in (1, 3, 7):  # any split of the stream gives the same reply
        assert _streamed(reply, size) == expected, size


def test_the_parser_is_chosen_by_flag_or_by_the_template() -> None:
    assert parser_class("hermes", None) is HermesParser
    assert parser_class(None, published_template("qwen3")) is HermesParser
    assert parser_class(None, published_template("qwen2_vl")) is None
    with pytest.raises(Exception, match="--tool-call-parser"):
        require_parser(None, "{{ messages }}", "m")


# ---------------------------------------------------------------- a real server with the published Qwen3 template


@pytest.fixture(scope="module")
def server(tiny_qwen3: Path) -> Iterator[RunningServer]:
    srv = start_server(tiny_qwen3, name=MODEL, engine={"max_concurrency": 4, "max_queue": 8})
    yield srv
    srv.stop()


@pytest.fixture
def scripted(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Script:
    """Make the engine "write" a given reply, and record the requests (their rendered prompts) it got."""
    return scripted_engine(server, monkeypatch)


def test_the_prompt_carries_the_tool_schema_as_the_template_writes_it(server: RunningServer, scripted: Script) -> None:
    seen = scripted("ok")
    server.client().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=8)
    prompt = seen[-1].prompt.text
    assert prompt is not None
    # Qwen3's template: one ``tool | tojson`` per line inside <tools>, before the user's turn
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(TIME) + "\n</tools>" in prompt
    assert prompt.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_a_history_of_calls_and_results_renders(server: RunningServer, scripted: Script) -> None:
    seen = scripted("It is 21 degrees in Paris.")
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    out = server.client().chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8)
    assert out.choices[0].message.content == "It is 21 degrees in Paris."
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    prompt = seen[-1].prompt.text
    assert prompt is not None
    assert "<|im_start|>assistant\n" + CALL + "<|im_end|>\n" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n' in prompt


def test_a_call_comes_back_as_openai_tool_calls(server: RunningServer, scripted: Script) -> None:
    scripted("Let me check.\n" + CALL)
    out = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_parallel_calls_have_their_own_ids_and_no_content(server: RunningServer, scripted: Script) -> None:
    scripted(CALL + "\n" + CALL_TIME)
    out = server.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=True
    )
    message = out.choices[0].message
    assert message.content is None and out.choices[0].finish_reason == "tool_calls"
    calls = message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2


def test_streamed_calls_reassemble_in_the_clients_stream_helper(server: RunningServer, scripted: Script) -> None:
    scripted("Let me check.\n" + CALL + "\n" + CALL_TIME, piece=3)
    with server.client().chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER, TIME]) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("size", [1, 2, 5, 200])
def test_the_incremental_hermes_parser_announces_calls_and_streams_their_arguments(size: int) -> None:
    arguments = '{"a": [1, {"b": "}]\\\\"}], "c": "x"}'
    reply = '<tool_call>\n{"name": "f", "arguments": ' + arguments + "}\n</tool_call>\n" + CALL_TIME[:-14]
    parser = HermesParser()
    parser.incremental = True
    events = [e for i in range(0, len(reply), size) for e in parser.feed(reply[i : i + size])] + parser.finish()
    kinds = [type(e) for e in events]
    assert kinds[0] is CallStart and events[0] == CallStart("f")
    first_close = kinds.index(ParsedCall)
    assert set(kinds[1:first_close]) == {ArgumentsPiece}
    assert "".join(e.text for e in events[1:first_close]) == arguments  # type: ignore[union-attr]
    assert events[first_close] == ParsedCall("f", arguments, opened=True)
    # the second call is cut before its end (the token limit): announced, it still closes as a call
    assert events[first_close + 1] == CallStart("get_time") and events[-1] == ParsedCall("get_time", "{}", opened=True)


def test_enforced_calls_stream_their_arguments_as_written(server: RunningServer, scripted: Script) -> None:
    """Under an enforced call grammar a call is certain once its name is written: its id and name come first,
    then its arguments in the fragments the model writes, which the client's helper joins into the final
    arguments (exactly their concatenation); a second call gets the next index."""
    arguments = '{"city": "Paris", "note": "a \\"quoted\\" }"}'
    reply = '<tool_call>\n{"name": "get_weather", "arguments": ' + arguments + "}\n</tool_call>\n" + CALL_TIME
    seen = scripted(reply, piece=3)
    kwargs = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required"}
    with server.client().chat.completions.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert seen[-1].sampling.structured is not None  # the grammar that makes an opened call certain
    fragments = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    first = [e.arguments_delta for e in fragments if e.index == 0]
    assert len(first) >= len(arguments) // 3 - 1  # fragment by fragment, as the reply came
    assert "".join(first) == done[0].arguments == arguments and json.loads(arguments)["note"] == 'a "quoted" }'
    calls = final.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", arguments), ("get_time", "{}")]
    assert [e.index for e in done] == [0, 1] and final.choices[0].finish_reason == "tool_calls"
    # the call's head (id, name) opened the stream's tool calls, before any of its arguments
    chunks = [e.chunk for e in events if e.type == "chunk"]
    heads = [(i, tc) for i, c in enumerate(chunks) for tc in c.choices[0].delta.tool_calls or [] if tc.id]
    first_fragment = next(i for i, c in enumerate(chunks) for tc in c.choices[0].delta.tool_calls or [] if not tc.id)
    assert heads[0][0] < first_fragment and heads[0][1].function.name == "get_weather"  # type: ignore[union-attr]


def test_streamed_deltas_are_openai_shaped(server: RunningServer, scripted: Script) -> None:
    scripted("Let me check.\n" + CALL, piece=5)
    chunks = list(server.client().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me check."
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    head, *rest = pieces
    assert head.index == 0 and head.id and head.id.startswith("call_") and head.type == "function"
    assert head.function is not None and head.function.name == "get_weather"
    assert all(p.index == 0 and p.id is None for p in rest)  # then argument fragments only
    arguments = "".join((p.function.arguments or "") for p in pieces if p.function)
    assert json.loads(arguments) == {"city": "Paris"}
    # text before the call streamed before it; the last chunk says why the reply ended
    first_call = next(i for i, d in enumerate(deltas) if d.tool_calls)
    assert "".join(d.content or "" for d in deltas[:first_call]) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_broken_json_is_plain_content(server: RunningServer, scripted: Script, stream: bool) -> None:
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'
    scripted(reply)
    client = server.client()
    if stream:
        with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER]) as s:
            message, finish = (final := s.get_final_completion()).choices[0].message, final.choices[0].finish_reason
    else:
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER])
        message, finish = out.choices[0].message, out.choices[0].finish_reason
    assert message.content == reply and not message.tool_calls and finish == "stop"


def test_tool_choice_none_neither_renders_nor_parses(server: RunningServer, scripted: Script) -> None:
    seen = scripted(CALL)
    out = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.content == CALL and out.choices[0].message.tool_calls is None
    assert "<tools>" not in (seen[-1].prompt.text or "")


def test_the_real_model_with_tools_answers_in_text(server: RunningServer) -> None:
    """No stub: the random tiny model writes no call, so its reply is content, streamed or not."""
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.choices[0].message.tool_calls is None
    chunks = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=6, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == out.choices[0].message.content
    assert not any(d.tool_calls for d in deltas)


# ---------------------------------------------------------------- refused, with a 400 that says why


def _post(server: RunningServer, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": server.model_name, "messages": ASK, "max_tokens": 2, **body},
        timeout=60,
    )


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "named function not among the tools",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        "tool_choice",
        "names the function 'get_time', which is not among the tools",
    ),
    ("choice without tools", {"tool_choice": "auto"}, "tool_choice", "only allowed when tools are specified"),
    ("duplicate names", {"tools": [WEATHER, WEATHER]}, "tools", "'get_weather' appears twice"),
    (
        "bad name",
        {"tools": [{"type": "function", "function": {"name": "get weather!"}}]},
        "tools[0].function.name",
        "",
    ),
    (
        "schema not an object",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters",
        "JSON schema of an object",
    ),
    (
        "result without a call",
        {"tools": [WEATHER], "messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
        "messages[1].tool_call_id",
        "which no earlier assistant message made",
    ),
    (
        "arguments not json",
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
        "JSON object encoded as a string",
    ),
    ("empty assistant", {"messages": [*ASK, {"role": "assistant"}]}, "messages[1].assistant", "content, tool_calls"),
]


@pytest.mark.parametrize(("body", "param", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_cannot_be_honoured_is_a_400(
    server: RunningServer, body: dict[str, Any], param: str, message: str
) -> None:
    resp = _post(server, **body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert _post(server).status_code == 200  # and the server keeps serving


def test_a_template_without_tools_is_a_400_naming_the_model(tiny_qwen2: Path) -> None:
    """The tiny Qwen2's template has no tools (the tiny Omni's renders them in the Hermes format)."""
    text_server = start_server(tiny_qwen2, name="tiny-qwen2")
    try:
        resp = _post(text_server, tools=[WEATHER])
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "tools"
        assert error["message"] == (
            "this model's chat template does not render tools: 'tiny-qwen2' cannot be given tools"
        )
        # tool_choice "none" asks for no tools in the prompt: nothing to refuse
        assert _post(text_server, tools=[WEATHER], tool_choice="none").status_code == 200
    finally:
        text_server.stop()
