"""The Llama 3 JSON and Mistral ``[TOOL_CALLS]`` (v3 and v11) tool-call formats, on their publishers' own templates.

The parsers on replies as those models write them (whole and streamed in pieces of several sizes must
agree), the choice of parser from the published templates, and, through a real server whose tiny text
model carries the published Llama 3.2, Mistral Nemo (v3) or Mistral Small 3.2 (v11) template: scripted
replies coming back as OpenAI ``tool_calls`` (streamed and not), the tools and a past call rendered by the
template, and ``tool_choice`` "required" / named on the untrained model, where only the format's grammar
can make the calls parse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from omniserve.tools.base import ArgumentsPiece, CallStart, ParsedCall, TextPiece, ToolCallParser
from omniserve.tools.hermes import HermesParser
from omniserve.tools.llama3_json import Llama3JsonParser
from omniserve.tools.mistral import MistralParser, MistralV11Parser
from omniserve.tools.registry import parser_class
from tests.conftest import RunningServer, start_server
from tests.scripted_engine import Script, scripted_engine
from tests.test_train_support import published_template, with_chat_template

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,10}$"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
PARIS = ParsedCall("get_weather", '{"city": "Paris", "unit": "c"}')
NOW = ParsedCall("get_time", "{}")

L_CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
L_TIME = '{"name": "get_time", "parameters": {}}'
M_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
M_TIME = '{"name": "get_time", "arguments": {}}'


def _merged(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if out and isinstance(event, TextPiece) and isinstance(out[-1], TextPiece):
            out[-1] = TextPiece(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def _agree(parser: type[ToolCallParser], reply: str, expected: list[Any]) -> None:
    assert _merged(parser().parse_all(reply)) == expected
    for size in (1, 2, 5, 11):  # any split of the stream gives the same reply
        one = parser()
        events = [e for i in range(0, len(reply), size) for e in one.feed(reply[i : i + size])]
        assert _merged(events + one.finish()) == expected, size


# ---------------------------------------------------------------- Llama 3 JSON


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (L_CALL, [PARIS]),
        ("<|python_tag|>" + L_CALL, [PARIS]),
        ("\n " + L_CALL + "\n", [PARIS]),
        (L_CALL + "; " + L_TIME, [PARIS, NOW]),
        (L_CALL + ";" + L_TIME + ";", [TextPiece(L_CALL + ";" + L_TIME + ";")]),  # ";" promises another call
        ('{"name": "get_time", "arguments": "{}"}', [NOW]),  # some fine-tunes say arguments, encoded
        ("It is sunny in Paris.", [TextPiece("It is sunny in Paris.")]),
        ("The JSON is {} here", [TextPiece("The JSON is {} here")]),  # a brace mid-text is text
        (L_CALL[:-1], [TextPiece(L_CALL[:-1])]),  # broken JSON
        (L_CALL + " and then text", [TextPiece(L_CALL + " and then text")]),
        ('{"answer": 42}', [TextPiece('{"answer": 42}')]),  # a JSON answer: no name, not a call
        ('{"name": "f", "parameters": [1]}', [TextPiece('{"name": "f", "parameters": [1]}')]),
        ("<|python", [TextPiece("<|python")]),
    ],
    ids=[
        "one call",
        "python tag",
        "blank around",
        "two calls",
        "dangling separator",
        "encoded arguments",
        "text",
        "brace in text",
        "broken json",
        "text after call",
        "json answer",
        "arguments not an object",
        "unfinished marker",
    ],
)
def test_llama3_parser_whole_and_streamed_agree(reply: str, expected: list[Any]) -> None:
    _agree(Llama3JsonParser, reply, expected)


# ---------------------------------------------------------------- Mistral [TOOL_CALLS]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[TOOL_CALLS][" + M_CALL + "]", [PARIS]),
        ("[TOOL_CALLS] [" + M_CALL + ", " + M_TIME + "]", [PARIS, NOW]),
        ('[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abcdefghi"}]', [NOW]),
        ("Let me check.\n[TOOL_CALLS][" + M_CALL + "]\n", [TextPiece("Let me check."), PARIS]),
        ("[TOOL_CALLS][" + M_CALL + "] Done.", [PARIS, TextPiece(" Done.")]),
        ("[TOOL_CALLS][" + M_CALL, [TextPiece("[TOOL_CALLS][" + M_CALL)]),  # cut off / broken
        ('[TOOL_CALLS][{"arguments": {}}] x', [TextPiece('[TOOL_CALLS][{"arguments": {}}] x')]),  # no name
        ("[TOOL_CALLS] sorry", [TextPiece("[TOOL_CALLS] sorry")]),
        ("a [TOOL and [b]", [TextPiece("a [TOOL and [b]")]),
        # the control token dropped by a decoder that skips special tokens: an opening array of calls
        ("\n[" + M_CALL + "]", [PARIS]),
        ('[{"answer": 1}] is it', [TextPiece('[{"answer": 1}] is it')]),
        ("[1] says so", [TextPiece("[1] says so")]),
        ("Text [" + M_CALL + "]", [TextPiece("Text [" + M_CALL + "]")]),  # only at the start
    ],
    ids=[
        "one",
        "two with space",
        "id kept out",
        "text then call",
        "call then text",
        "broken",
        "no name",
        "no array",
        "text",
        "bare array",
        "bare array not calls",
        "bracket text",
        "array mid-text",
    ],
)
def test_mistral_parser_whole_and_streamed_agree(reply: str, expected: list[Any]) -> None:
    _agree(MistralParser, reply, expected)


V_CALL = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}'
V_TIME = "[TOOL_CALLS]get_time[ARGS]{}"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (V_CALL, [PARIS]),
        (V_CALL + V_TIME, [PARIS, NOW]),
        ("[TOOL_CALLS]get_time[CALL_ID]abc123xyz[ARGS] {}", [NOW]),  # an id, as a history writes one
        ("Let me check.\n" + V_CALL + "\n", [TextPiece("Let me check."), PARIS]),
        (V_CALL + " Done.", [PARIS, TextPiece(" Done.")]),
        (V_CALL[:-1], [TextPiece(V_CALL[:-1])]),  # cut off
        (V_CALL + V_TIME[:-1], [PARIS, TextPiece(V_TIME[:-1])]),  # the first call stands
        ("[TOOL_CALLS]get weather[ARGS]{}", [TextPiece("[TOOL_CALLS]get weather[ARGS]{}")]),  # not a name
        ("[TOOL_CALLS][ARGS]{}", [TextPiece("[TOOL_CALLS][ARGS]{}")]),
        ("[TOOL_CALLS]f[ARGS][1]", [TextPiece("[TOOL_CALLS]f[ARGS][1]")]),  # arguments not an object
        ("[TOOL_CALLS] sorry,\nno", [TextPiece("[TOOL_CALLS] sorry,\nno")]),
        ("[" + M_CALL + "]", [TextPiece("[" + M_CALL + "]")]),  # the v3 array is not this format
    ],
    ids=[
        "one",
        "two",
        "call id",
        "text then call",
        "call then text",
        "cut off",
        "second cut off",
        "bad name",
        "no name",
        "array arguments",
        "no call",
        "v3 array",
    ],
)
def test_mistral_v11_parser_whole_and_streamed_agree(reply: str, expected: list[Any]) -> None:
    _agree(MistralV11Parser, reply, expected)


# ---------------------------------------------------------------- chosen from the published templates


def test_each_published_template_picks_its_parser() -> None:
    assert parser_class(None, published_template("llama3_2")) is Llama3JsonParser
    assert parser_class(None, published_template("mistral_nemo")) is MistralParser
    assert parser_class(None, published_template("mistral_small_3_2")) is MistralV11Parser
    assert parser_class(None, published_template("qwen3")) is HermesParser
    # Mistral Small 3.1's template renders no tools: nothing claims it
    assert parser_class(None, published_template("mistral3")) is None
    assert parser_class("llama3_json", published_template("qwen3")) is Llama3JsonParser  # the flag wins


# ---------------------------------------------------------------- through a real server


#: Per published template: two calls as the model writes them, the tools as the prompt lists them, and the
#: past call of the history below as the template renders it.
FORMATS = {
    "llama3_2": (
        L_CALL + "; " + L_TIME,
        "\n\n".join(json.dumps(t, indent=4) for t in (WEATHER, TIME)),
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + L_CALL + "<|eot_id|>",
    ),
    "mistral_nemo": (
        "[TOOL_CALLS][" + M_CALL + ", " + M_TIME + "]",
        "[AVAILABLE_TOOLS][" + ", ".join(json.dumps(t) for t in (WEATHER, TIME)) + "][/AVAILABLE_TOOLS]",
        "[TOOL_CALLS][" + M_CALL[:-1] + ', "id": "abc123xyz"}]',
    ),
    "mistral_small_3_2": (
        V_CALL + V_TIME,
        "[AVAILABLE_TOOLS]" + json.dumps([WEATHER, TIME]) + "[/AVAILABLE_TOOLS]",
        '[TOOL_CALLS]get_weather[CALL_ID]abc123xyz[ARGS]{"city": "Paris", "unit": "c"}',
    ),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def server(
    request: pytest.FixtureRequest, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    name = request.param
    model = with_chat_template(tiny_qwen2, tmp_path_factory.mktemp("parsers") / name, published_template(name))
    srv = start_server(model, name=name, engine={"max_concurrency": 8, "max_queue": 16})
    yield srv
    srv.stop()


@pytest.fixture
def scripted(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Script:
    return scripted_engine(server, monkeypatch)


def test_the_prompt_carries_the_tools_and_a_past_call_as_the_template_writes_them(
    server: RunningServer, scripted: Script
) -> None:
    _, tools_text, past = FORMATS[server.model_name]
    seen = scripted("ok")
    server.client().chat.completions.create(model=server.model_name, messages=ASK, tools=[WEATHER, TIME], max_tokens=4)
    assert tools_text in (seen[-1].prompt.text or "")
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "abc123xyz",  # Mistral's template insists on 9 characters
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "abc123xyz", "content": '{"temp": 21}'},
    ]
    out = server.client().chat.completions.create(model=server.model_name, messages=history, tools=[WEATHER])
    assert out.choices[0].message.content == "ok"
    assert past in (seen[-1].prompt.text or "")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_call_comes_back_as_openai_tool_calls(server: RunningServer, scripted: Script, stream: bool) -> None:
    scripted(FORMATS[server.model_name][0], piece=3)
    client, kwargs = server.client(), {"model": server.model_name, "messages": ASK, "tools": [WEATHER, TIME]}
    if stream:
        with client.chat.completions.stream(**kwargs) as s:
            choice = s.get_final_completion().choices[0]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2


def test_broken_call_is_plain_content(server: RunningServer, scripted: Script) -> None:
    reply = FORMATS[server.model_name][0]
    reply = reply[: len(reply) // 2]  # the first call cut short
    scripted(reply)
    out = server.client().chat.completions.create(model=server.model_name, messages=ASK, tools=[WEATHER])
    assert out.choices[0].message.content == reply and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


def _id_shape(model: str) -> str:
    """The call ids a server gives: 9 alphanumerics for Mistral's templates (they refuse any other), else OpenAI's."""
    return "[A-Za-z0-9]{9}" if model.startswith("mistral") else "call_[0-9a-f]{24}"


def _check_calls(calls: list[Any], allowed: set[str], model: str) -> None:
    assert calls
    for call in calls:
        assert re.fullmatch(_id_shape(model), call.id) and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_tool_choice_on_the_untrained_model_gives_valid_calls(server: RunningServer, stream: bool) -> None:
    client, model = server.client(), server.model_name
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice_kind, allowed in (("required", {"get_weather", "get_time"}), (named, {"get_weather"})):
        kwargs = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice_kind}
        kwargs |= {"max_tokens": 200, "seed": 3}
        if stream:
            with client.chat.completions.stream(**kwargs) as s:
                choice = s.get_final_completion().choices[0]
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert not choice.message.content
        _check_calls(choice.message.tool_calls or [], allowed, model)
        if choice_kind is named:
            assert len(choice.message.tool_calls or []) == 1


def test_forced_calls_stream_their_arguments_in_fragments(server: RunningServer) -> None:
    """The untrained model under its format's call grammar: each call's id and name come first, in one delta with
    the call's index (0, 1, ... for parallel calls), then its arguments in fragments as the model writes them,
    which join into exactly the arguments of the same request answered whole. The Responses API streams them
    as ``response.function_call_arguments.delta`` events joining into the ``.done`` arguments."""
    client, model = server.client(), server.model_name
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice_kind in ("required", named):
        kwargs = {"model": model, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice_kind}
        kwargs |= {"max_tokens": 200, "seed": 3}
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        heads: list[Any] = []
        fragments: list[list[str]] = []
        for chunk in chunks:
            for delta in chunk.choices[0].delta.tool_calls or []:
                assert delta.function is not None
                if delta.id is not None:  # a call's head: the next index, its name, no arguments yet
                    assert delta.index == len(heads) and delta.type == "function" and delta.function.name
                    assert not delta.function.arguments
                    heads.append(delta)
                    fragments.append([])
                else:  # a fragment of the open call's arguments
                    assert delta.index == len(heads) - 1 and delta.function.name is None and delta.function.arguments
                    fragments[-1].append(delta.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls or []  # type: ignore[call-overload]
        streamed = [(head.function.name, "".join(parts)) for head, parts in zip(heads, fragments, strict=True)]
        assert streamed == [(c.function.name, c.function.arguments) for c in whole]
        _check_calls(whole, {"get_weather", "get_time"}, model)
        weather = [
            len(parts) for head, parts in zip(heads, fragments, strict=True) if head.function.name == "get_weather"
        ]
        assert all(count > 1 for count in weather) and (weather or choice_kind == "required")

    weather_tool = {"type": "function", **WEATHER["function"]}
    choice = {"type": "function", "name": "get_weather"}
    with client.responses.stream(
        model=model,
        input="Weather in Paris?",
        tools=[weather_tool],
        tool_choice=choice,
        max_output_tokens=200,  # type: ignore[arg-type]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    [item] = final.output
    assert len(deltas) > 1 and "".join(deltas) == done.arguments == item.arguments  # type: ignore[union-attr]
    jsonschema.validate(json.loads(done.arguments), WEATHER_SCHEMA)


def test_a_call_and_its_result_sent_back_render_with_the_template(server: RunningServer) -> None:
    """The second turn of a tool conversation: the call the server made, with its id, and the tool's result.
    Mistral's templates raise on ids that are not 9 alphanumerics, so the ids the server gives must be those;
    the same through the Responses API's store (``previous_response_id``)."""
    client, model = server.client(), server.model_name
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = {"model": model, "tools": [WEATHER], "tool_choice": named, "max_tokens": 200, "seed": 3}
    first = client.chat.completions.create(messages=ASK, **kwargs).choices[0].message  # type: ignore[call-overload]
    [call] = first.tool_calls or []
    assert re.fullmatch(_id_shape(model), call.id)
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}
    history = [*ASK, first.model_dump(exclude_none=True), result]
    second = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=2)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")

    weather = {"type": "function", **WEATHER["function"]}
    asked = client.responses.create(
        model=model,
        input="Weather in Paris?",
        tools=[weather],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
    )
    [item] = asked.output
    assert item.type == "function_call" and re.fullmatch(_id_shape(model), item.call_id)
    output = {"type": "function_call_output", "call_id": item.call_id, "output": '{"temp": 21}'}
    follow = client.responses.create(
        model=model, previous_response_id=asked.id, input=[output], tools=[weather], max_output_tokens=2
    )
    assert follow.status in ("completed", "incomplete")


def test_a_history_the_template_refuses_is_a_400_with_its_reason(server: RunningServer) -> None:
    """Llama 3.2 takes one call per assistant turn; Mistral Nemo wants 9-character call ids (a client's own may
    be longer): the template's own message comes back as a 400, never a 500."""
    calls = [
        {"id": f"call_{i}" * 3, "type": "function", "function": {"name": name, "arguments": "{}"}}
        for i, name in enumerate(("get_weather", "get_time"))
    ]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "x"} for c in calls]
    history = [*ASK, {"role": "assistant", "tool_calls": calls}, *results]
    body = {"model": server.model_name, "messages": history, "tools": [WEATHER, TIME], "max_tokens": 2}
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "messages" and "the model's chat template rejected the conversation" in error["message"]
    reason = "single tool-calls" if server.model_name == "llama3_2" else "length 9"
    assert reason in error["message"]


# ---------------------------------------------------------------- markers that are control tokens

MARKERS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")


@pytest.fixture(scope="module")
def mistral_tokens_server(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny text model with the Mistral Small 3.2 (v11) template whose tokenizer holds the call markers as
    special tokens, as Mistral's own tokenizers do (the embeddings grow by the three new rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("mistral-tokens") / "mistral_v11_tokens"
    model_dir = with_chat_template(tiny_qwen2, folder, published_template("mistral_small_3_2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(list(MARKERS), special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    srv = start_server(model_dir, name="mistral-v11-tokens", engine={"max_concurrency": 4, "max_queue": 8})
    yield srv
    srv.stop()


def test_special_token_markers_stay_in_the_text_of_requests_with_tools(mistral_tokens_server: RunningServer) -> None:
    """``[TOOL_CALLS]name[ARGS]{...}`` where the markers are control tokens: the engine keeps exactly those in
    the text (others, such as the end-of-turn token, never reach the content), so the call parses; without
    tools the same tokens are dropped as any special token."""
    server = mistral_tokens_server
    tokenizer = server.engine._tokenizer  # type: ignore[attr-defined]
    marker_ids = set(tokenizer.convert_tokens_to_ids(list(MARKERS)))
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = {"model": server.model_name, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": named}
    kwargs |= {"max_tokens": 120, "n": 4, "temperature": 1.0, "seed": 5, "logprobs": True}
    out = server.client().chat.completions.create(**kwargs)
    generated = [
        set(tokenizer.convert_tokens_to_ids([t.token for t in c.logprobs.content]))
        for c in out.choices  # type: ignore[union-attr]
    ]
    assert any(ids & marker_ids for ids in generated)  # the grammar let the model write the special tokens
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert not choice.message.content
        [call] = choice.message.tool_calls or []
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    # the detokenizer itself: the same ids, without tools (nothing kept) and with the format's markers kept
    from omniserve.engines.detokenizer import IncrementalDetokenizer

    ids = tokenizer.encode('hi[TOOL_CALLS]f[ARGS]{"a": 1}<|im_end|>', add_special_tokens=False)
    assert marker_ids <= set(ids) | {tokenizer.convert_tokens_to_ids("[CALL_ID]")}
    for keep, text in (((), 'hif{"a": 1}'), (MARKERS, 'hi[TOOL_CALLS]f[ARGS]{"a": 1}')):
        detok = IncrementalDetokenizer(tokenizer, (), keep)
        assert "".join(detok.add(i)[0] for i in ids) + detok.flush() == text


# ---------------------------------------------------------------- incremental: arguments streamed as written

#: Arguments that a bracket counter must read right: nesting, brackets, braces and quotes inside strings, escaped
#: quotes and backslashes, unicode (two-byte, three-byte and astral characters).
TRICKY = (
    '{"q": {"nested": [1, {"deep": [true, null]}], "s": "a } ] { [ \\" \\\\ end\\\\"}, '
    '"text": "caf\\u00e9 é ☃ 🌍", "n": -1.5e3}'
)


def _l3(name: str, arguments: str) -> str:
    return '{"name": "' + name + '", "parameters": ' + arguments + "}"


def _m3(name: str, arguments: str) -> str:
    return '{"name": "' + name + '", "arguments": ' + arguments + "}"


#: Per format, replies as an enforced call grammar writes them: (parser, reply, [(name, arguments)], text).
INCREMENTAL = {
    "hermes parallel": (
        HermesParser,
        "Let me check.\n<tool_call>\n" + _m3("f", TRICKY) + "\n</tool_call>\n<tool_call>\n" + M_TIME + "\n</tool_call>",
        [("f", TRICKY), ("get_time", "{}")],
        "Let me check.",
    ),
    "llama3 one": (Llama3JsonParser, _l3("f", TRICKY), [("f", TRICKY)], ""),
    "llama3 parallel": (
        Llama3JsonParser,
        "<|python_tag|>" + _l3("f", TRICKY) + "; " + _l3("get_time", "{}"),
        [("f", TRICKY), ("get_time", "{}")],
        "",
    ),
    "llama3 blanks": (
        Llama3JsonParser,
        ' \n{"name": "f" ,  "parameters" :  {"a": [ ]} }\n',
        [("f", '{"a": [ ]}')],
        "",
    ),
    "mistral one": (MistralParser, "[TOOL_CALLS][" + _m3("f", TRICKY) + "]", [("f", TRICKY)], ""),
    "mistral parallel": (
        MistralParser,
        "Checking.\n[TOOL_CALLS] [" + _m3("f", TRICKY) + ", " + _m3("get_time", "{}") + "] Done.",
        [("f", TRICKY), ("get_time", "{}")],
        "Checking. Done.",
    ),
    "mistral v11 one": (MistralV11Parser, "[TOOL_CALLS]f[ARGS]" + TRICKY, [("f", TRICKY)], ""),
    "mistral v11 parallel": (
        MistralV11Parser,
        "Sure.[TOOL_CALLS]f[ARGS]" + TRICKY + "[TOOL_CALLS]get_time[CALL_ID]abc123xyz[ARGS] {}",
        [("f", TRICKY), ("get_time", "{}")],
        "Sure.",
    ),
}


def _incremental(parser: type[ToolCallParser], pieces: list[str]) -> list[Any]:
    one = parser()
    one.incremental = True
    return [e for piece in pieces for e in one.feed(piece)] + one.finish()


def _calls_of(events: list[Any]) -> tuple[list[tuple[str, str]], list[int], str]:
    """The calls as announced and streamed (each checked to close with exactly its pieces), how many argument
    pieces each came in, and the text around them; fails on anything an announced call would have to take back."""
    calls: list[tuple[str, str]] = []
    counts: list[int] = []
    text, open_name, pieces = "", None, []
    for event in events:
        if isinstance(event, CallStart):
            assert open_name is None
            open_name, pieces = event.name, []
        elif isinstance(event, ArgumentsPiece):
            assert open_name is not None and event.text
            pieces.append(event.text)
        elif isinstance(event, ParsedCall):
            assert event.opened and event.name == open_name and event.arguments == "".join(pieces)
            calls.append((event.name, event.arguments))
            counts.append(len(pieces))
            open_name = None
        else:
            assert open_name is None  # no text inside an announced call
            text += event.text
    assert open_name is None
    return calls, counts, text


@pytest.mark.parametrize("case", list(INCREMENTAL))
def test_incremental_parsers_stream_arguments_char_by_char_and_in_any_pieces(case: str) -> None:
    """Under an enforced grammar each call is announced (name first), then its arguments come in the pieces the
    model writes them in: character by character, one piece per character; and whatever the split, the pieces
    join into exactly the arguments the model wrote, which the whole reply read at once gives too."""
    parser, reply, expected, text = INCREMENTAL[case]
    calls, counts, said = _calls_of(_incremental(parser, list(reply)))
    assert calls == expected and said == text
    assert counts == [len(arguments) for _, arguments in expected]  # nothing held back: one piece per character
    for size in (2, 3, 7, len(reply)):
        pieces = [reply[i : i + size] for i in range(0, len(reply), size)]
        assert _calls_of(_incremental(parser, pieces))[::2] == (expected, text), size
    # the same calls as the parser reads them without a grammar (re-encoded there: compared as values)
    held = [(e.name, json.loads(e.arguments)) for e in parser().parse_all(reply) if isinstance(e, ParsedCall)]
    assert held == [(name, json.loads(arguments)) for name, arguments in expected]


@pytest.mark.parametrize("case", [c for c in INCREMENTAL if "parallel" in c])
def test_incremental_parsers_stream_token_by_token(case: str, tiny_qwen2: Path) -> None:
    """The reply as an engine hands it over: the tiny model's real tokens through the engine's incremental
    detokenizer (multi-byte characters split across byte-level tokens are held until whole)."""
    from transformers import AutoTokenizer

    from omniserve.engines.detokenizer import IncrementalDetokenizer

    parser, reply, expected, text = INCREMENTAL[case]
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    detokenizer = IncrementalDetokenizer(tokenizer, (), parser.SPECIAL_TOKENS)
    ids = tokenizer.encode(reply, add_special_tokens=False)
    pieces = [detokenizer.add(i)[0] for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == reply
    calls, counts, said = _calls_of(_incremental(parser, pieces))
    assert calls == expected and said == text
    assert counts[0] > 5  # the long arguments came in many fragments, token by token


@pytest.mark.parametrize(
    ("parser", "reply", "expected"),
    [
        (
            Llama3JsonParser,
            '{"name": "f", "parameters": {"a": "x", "b',
            [CallStart("f"), ParsedCall("f", '{"a": "x", "b', opened=True)],
        ),
        (
            MistralParser,
            "[TOOL_CALLS][" + _m3("f", "{}") + ', {"name": "g", "arguments": {"a',
            [CallStart("f"), ParsedCall("f", "{}", opened=True), CallStart("g"), ParsedCall("g", '{"a', opened=True)],
        ),
        (
            MistralV11Parser,
            "[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[ARGS]" + '{"a": [',
            [
                CallStart("f"),
                ParsedCall("f", "{}", opened=True),
                CallStart("g"),
                ParsedCall("g", '{"a": [', opened=True),
            ],
        ),
        (MistralParser, "[TOOL_CALLS][" + _m3("f", "{}"), [CallStart("f"), ParsedCall("f", "{}", opened=True)]),
        (  # the next call's name not yet whole: not announced, what was written of it is text
            Llama3JsonParser,
            _l3("f", "{}") + '; {"name": "g',
            [CallStart("f"), ParsedCall("f", "{}", opened=True), TextPiece(' {"name": "g')],
        ),
        (  # text after a call (free under "auto" with strict tools)
            Llama3JsonParser,
            _l3("f", "{}") + " Done.",
            [CallStart("f"), ParsedCall("f", "{}", opened=True), TextPiece(" Done.")],
        ),
    ],
    ids=[
        "llama3",
        "mistral",
        "mistral v11",
        "mistral before the array closes",
        "llama3 before the next name",
        "llama3 text after",
    ],
)
def test_an_announced_call_is_never_taken_back(parser: type[ToolCallParser], reply: str, expected: list[Any]) -> None:
    """Once announced a call is never taken back: cut short (the token limit), it closes with what was written of
    its arguments; a call whose name was not yet whole is not announced at all, and text after a call is text."""
    for pieces in (list(reply), [reply]):
        assert _merged([e for e in _incremental(parser, pieces) if not isinstance(e, ArgumentsPiece)]) == expected


@pytest.mark.parametrize(
    ("parser", "reply", "expected"),
    [
        (Llama3JsonParser, '{"name": "get_time", "parameters": "{}"}', [NOW]),  # arguments encoded as a string
        (MistralParser, '[TOOL_CALLS][{"name": "get_time", "arguments": "{}"}]', [NOW]),
        (MistralParser, '[TOOL_CALLS][{"arguments": {}, "name": "get_time"}]', [NOW]),  # name last
        (MistralParser, '\n[{"name": "get_time", "arguments": {}}]', [NOW]),  # no marker: not the grammar's text
        (Llama3JsonParser, "It is sunny.", [TextPiece("It is sunny.")]),
        (MistralV11Parser, "[TOOL_CALLS]get weather[ARGS]{}", [TextPiece("[TOOL_CALLS]get weather[ARGS]{}")]),
        # under "auto" with strict tools a call is enforced from the trigger ``{"name": `` on: text before is free
        (Llama3JsonParser, '{ "name": "get_time", "parameters": {}}', [NOW]),
        (Llama3JsonParser, '{ "name": "f", "parameters": {', [TextPiece('{ "name": "f", "parameters": {')]),
    ],
    ids=[
        "llama3 encoded",
        "mistral encoded",
        "mistral name last",
        "mistral bare array",
        "llama3 text",
        "mistral v11 bad name",
        "llama3 untriggered",
        "llama3 untriggered cut",
    ],
)
def test_what_an_incremental_parser_cannot_stream_is_read_whole(
    parser: type[ToolCallParser], reply: str, expected: list[Any]
) -> None:
    """Calls in a shape the call grammar never writes are still read, whole, as without a grammar; text stays text."""
    for pieces in (list(reply), [reply]):
        assert _merged(_incremental(parser, pieces)) == expected
