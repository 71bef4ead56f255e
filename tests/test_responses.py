"""The Responses API (``/v1/responses``) with the official ``openai`` client against real servers.

Two servers: the session's tiny omni model (real generation, image and audio input, the real token
counts of a continued conversation) and a tiny text model with the published Qwen3 template whose
engine "writes" a scripted reply (as tests/test_tools.py does: the random tiny model never calls a
tool), so parsing, output items, stream events and the rendered history can be checked exactly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from omniserve.engines.base import ChoiceDelta, GenerationRequest
from omniserve.responses_store import PostgresStore, SqliteStore, StoredResponse, StoreUnavailable, open_store
from tests.conftest import RunningServer, free_port, start_server
from tests.media_factory import audio_bytes, png_bytes

OMNI = "tiny-omni"
MODEL = "tiny-qwen3"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# ---------------------------------------------------------------- the scripted server


@pytest.fixture(scope="module")
def server(tiny_qwen3: Path) -> Iterator[RunningServer]:
    srv = start_server(
        tiny_qwen3, name=MODEL, engine={"max_concurrency": 4, "max_queue": 8}, server={"responses_max_stored": 3}
    )
    yield srv
    srv.stop()


Script = Callable[..., list[GenerationRequest]]


@pytest.fixture
def scripted(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Script:
    """The engine "writes" the given reply a few characters at a time and records the requests it got.

    Only the engine's ``stream`` hook is replaced; HTTP, validation, rendering, admission, the parser, the
    store, SSE and the client are real. ``finish`` is how the reply ends ("length": cut by the token limit).
    """
    seen: list[GenerationRequest] = []

    def script(reply: str, *, piece: int = 4, finish: str = "stop") -> list[GenerationRequest]:
        async def stream(request: GenerationRequest, native: Any) -> AsyncIterator[ChoiceDelta]:
            seen.append(request)
            for start in range(0, len(reply), piece):
                yield ChoiceDelta(index=0, text=reply[start : start + piece], token_ids=[1])
            yield ChoiceDelta(index=0, finish_reason=finish)

        monkeypatch.setattr(server.engine, "stream", stream)
        return seen

    return script


def prompt_of(seen: list[GenerationRequest]) -> str:
    text = seen[-1].prompt.text
    assert text is not None
    return text


# ---------------------------------------------------------------- text, instructions, the Response object


def test_text_in_text_out_is_a_response_object(server: RunningServer, scripted: Script) -> None:
    seen = scripted("Hello there.")
    out = server.client().responses.create(model=MODEL, input="Hi!", instructions="Be brief.", max_output_tokens=20)
    assert out.object == "response" and out.id.startswith("resp_") and out.status == "completed"
    assert out.output_text == "Hello there." and out.incomplete_details is None
    [message] = out.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert out.usage is not None and out.usage.output_tokens == 3  # the script's 3 pieces of one token each
    assert out.usage.input_tokens == seen[-1].prompt.num_tokens
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    assert out.instructions == "Be brief." and out.max_output_tokens == 20 and out.model == MODEL
    # instructions are the system message, the string input the user's turn
    assert prompt_of(seen).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>")
    assert seen[-1].sampling.max_tokens == 20


def test_cut_by_max_output_tokens_is_incomplete(server: RunningServer, scripted: Script) -> None:
    scripted("Hello th", finish="length")
    out = server.client().responses.create(model=MODEL, input="Hi!", max_output_tokens=2)
    assert out.status == "incomplete"
    assert out.incomplete_details is not None and out.incomplete_details.reason == "max_output_tokens"
    assert out.output[0].status == "incomplete" and out.output_text == "Hello th"


def test_the_real_tiny_model_answers(client: openai.OpenAI) -> None:
    out = client.responses.create(model=OMNI, input="Say something.", max_output_tokens=3, temperature=0)
    assert out.status in ("completed", "incomplete") and out.usage is not None
    assert 1 <= out.usage.output_tokens <= 3
    assert out.status == "completed" or out.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


# ---------------------------------------------------------------- media input items


def test_image_and_audio_input_items_reach_the_model(client: openai.OpenAI) -> None:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(64, 48)).decode()
    audio = base64.b64encode(audio_bytes("wav", seconds=0.5, sample_rate=16_000)).decode()
    text = client.responses.create(model=OMNI, input="What is this?", max_output_tokens=1)
    media = client.responses.create(
        model=OMNI,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": image, "detail": "auto"},
                    {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                ],
            }
        ],
        max_output_tokens=1,
    )
    assert text.usage is not None and media.usage is not None
    assert media.usage.input_tokens > text.usage.input_tokens + 10  # image and audio tokens in the prompt


def test_broken_media_is_a_400_naming_the_input_item(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=OMNI,
            input=[
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            ],
        )
    assert (caught.value.body or {}).get("param", "").startswith("input[1].content[0]")  # type: ignore[union-attr]


# ---------------------------------------------------------------- function tools


def test_a_call_is_a_function_call_item_and_its_result_continues(server: RunningServer, scripted: Script) -> None:
    seen = scripted("Let me check.\n" + CALL)
    client = server.client()
    out = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    assert [item.type for item in out.output] == ["message", "function_call"]
    assert out.output_text == "Let me check."
    call = out.output[1]
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    assert out.tools[0].name == "get_weather" and out.tool_choice == "auto"  # type: ignore[union-attr]
    assert "<tools>" in prompt_of(seen) and '"name": "get_weather"' in prompt_of(seen)

    scripted("It is 21 degrees.")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    follow = client.responses.create(model=MODEL, previous_response_id=out.id, input=[result], tools=[WEATHER])  # type: ignore[list-item]
    prompt = prompt_of(seen)
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>" in prompt
    assert (
        "Let me check.\n\n" + CALL in prompt or "Let me check.\n" + CALL in prompt
    )  # the call, as the template writes it
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
    assert follow.output_text == "It is 21 degrees." and follow.previous_response_id == out.id


def test_calls_sent_back_by_the_client_render_as_the_assistants_turn(server: RunningServer, scripted: Script) -> None:
    """Without a store: the client replays the output items and adds the result (``input += output``)."""
    seen = scripted("Sunny.")
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    server.client().responses.create(model=MODEL, input=items, tools=[WEATHER], store=False)  # type: ignore[arg-type]
    assert "<|im_start|>assistant\n" + CALL + "<|im_end|>" in prompt_of(seen)
    assert "<tool_response>\nsunny\n</tool_response>" in prompt_of(seen)


def test_text_format_json_schema_reaches_the_chat_path(server: RunningServer, scripted: Script) -> None:
    seen = scripted('{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    out = server.client().responses.create(model=MODEL, input="JSON please", text=text)  # type: ignore[arg-type]
    assert seen[-1].sampling.structured is not None  # the constraint the chat path settled on
    assert out.text is not None and out.text.format is not None and out.text.format.type == "json_schema"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_tool_choice_is_enforced_by_the_chat_paths_grammar(
    server: RunningServer, scripted: Script, choice: Any
) -> None:
    seen = scripted(CALL)
    out = server.client().responses.create(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice=choice)  # type: ignore[list-item]
    assert seen[-1].sampling.structured is not None  # the parser's call grammar, as on /v1/chat/completions
    assert [item.type for item in out.output] == ["function_call"]
    echoed = out.tool_choice if isinstance(out.tool_choice, str) else out.tool_choice.model_dump(exclude_none=True)
    assert echoed == choice


# ---------------------------------------------------------------- streaming


def test_the_clients_stream_helper_accumulates_text_and_calls(server: RunningServer, scripted: Script) -> None:
    scripted("Let me check.\n" + CALL, piece=3)
    with server.client().responses.stream(model=MODEL, input="Weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds.count("response.output_text.delta") >= 3
    for name in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ):
        assert name in kinds, name
    assert kinds.index("response.output_text.done") < kinds.index("response.function_call_arguments.delta")
    assert final.output_text == "Let me check." and final.status == "completed"
    call = final.output[1]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    retrieved = server.client().responses.retrieve(final.id)  # stored before the last event was sent
    assert retrieved.output[1].call_id == call.call_id  # type: ignore[union-attr]


def test_a_forced_call_streams_its_arguments_as_the_model_writes_them(server: RunningServer, scripted: Script) -> None:
    """Under a forced ``tool_choice`` (the call grammar enforced) the call's item opens as soon as its name is
    written, and its arguments stream as ``response.function_call_arguments.delta`` events in the pieces the
    model writes them in; they join into exactly the ``.done`` arguments (the client helper's snapshot too),
    and the item's events come in the spec's order. The non-streamed answer carries the same arguments."""
    arguments = '{"city": "Paris", "note": "a \\"quoted\\" } ☃", "days": [1, {"x": []}]}'
    scripted('<tool_call>\n{"name": "get_weather", "arguments": ' + arguments + "}\n</tool_call>", piece=3)
    client, kwargs = (
        server.client(),
        {"model": MODEL, "input": "Weather?", "tools": [WEATHER], "tool_choice": "required"},
    )
    with client.responses.stream(**kwargs) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) >= len(arguments) // 3 - 1  # piece by piece, as the reply came
    added = kinds.index("response.output_item.added")
    assert kinds[added + 1 :] == [
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    opened, done, closed = events[added], events[-3], events[-2]
    assert opened.item.type == "function_call" and opened.item.name == "get_weather"  # type: ignore[union-attr]
    assert opened.item.arguments == "" and opened.item.status == "in_progress"  # type: ignore[union-attr]
    assert "".join(d.delta for d in deltas) == done.arguments == arguments  # type: ignore[union-attr]
    assert deltas[-1].snapshot == arguments  # the client helper's accumulation
    assert closed.item.arguments == arguments and closed.item.status == "completed"  # type: ignore[union-attr]
    ids = {opened.item.id, done.item_id, closed.item.id, *(d.item_id for d in deltas)}  # type: ignore[union-attr]
    assert len(ids) == 1 and {d.output_index for d in deltas} == {0}
    [item] = final.output
    assert item.type == "function_call" and item.arguments == arguments and item.call_id == opened.item.call_id  # type: ignore[union-attr]
    whole = client.responses.create(**kwargs)  # type: ignore[arg-type]
    assert [i.arguments for i in whole.output] == [arguments]  # type: ignore[union-attr]


def test_stream_true_on_the_real_model(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=OMNI, input="Hello", max_output_tokens=4, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    final = events[-1].response  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert final.output_text == deltas and final.usage.output_tokens >= 1
    added = next(e for e in events if e.type == "response.output_item.added")
    assert all(getattr(e, "item_id", added.item.id) == added.item.id for e in events)  # type: ignore[union-attr]


def test_a_stream_cut_by_the_limit_ends_incomplete(server: RunningServer, scripted: Script) -> None:
    scripted("abcdef", finish="length")
    events = list(server.client().responses.create(model=MODEL, input="x", max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


# ---------------------------------------------------------------- the store


def test_previous_response_id_carries_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=OMNI, input="My name is Ann.", max_output_tokens=4, temperature=0)
    second = client.responses.create(
        model=OMNI, input="What is my name?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    alone = client.responses.create(model=OMNI, input="What is my name?", max_output_tokens=4, temperature=0)
    assert first.usage and second.usage and alone.usage
    # the second prompt holds the first exchange: its input, its answer and the template's turn markers
    carried = second.usage.input_tokens - alone.usage.input_tokens
    assert carried >= first.usage.input_tokens + first.usage.output_tokens - 3  # less the final turn opener
    assert second.previous_response_id == first.id


def test_history_renders_the_first_exchange(server: RunningServer, scripted: Script) -> None:
    seen = scripted("Hello Ann.")
    client = server.client()
    first = client.responses.create(model=MODEL, input="My name is Ann.", instructions="Old rules.")
    scripted("Ann.")
    client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id)
    prompt = prompt_of(seen)
    assert "<|im_start|>user\nMy name is Ann.<|im_end|>\n<|im_start|>assistant\nHello Ann.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")
    assert "Old rules." not in prompt  # instructions are not carried over, as OpenAI's


def test_get_delete_and_input_items(server: RunningServer, scripted: Script) -> None:
    scripted("Hi.")
    client = server.client()
    out = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    )
    got = client.responses.retrieve(out.id)
    assert got.id == out.id and got.output_text == "Hi." and got.usage == out.usage
    items = client.responses.input_items.list(out.id, order="asc")
    assert [item.content[0].text for item in items.data] == ["one", "two"]  # type: ignore[union-attr]
    assert all(item.id.startswith("msg_") for item in items.data)  # type: ignore[union-attr]
    page = client.responses.input_items.list(out.id, limit=1)  # newest first
    assert [i.content[0].text for i in page.data] == ["two"] and page.has_more  # type: ignore[union-attr]
    client.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="x", previous_response_id=out.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_store_false_keeps_nothing_and_max_stored_drops_the_oldest(server: RunningServer, scripted: Script) -> None:
    scripted("ok")
    client = server.client()
    unstored = client.responses.create(model=MODEL, input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    ids = [client.responses.create(model=MODEL, input=f"n{i}").id for i in range(4)]  # the server keeps 3
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def _pg_tool(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server of the test's own (initdb into a temporary folder, on a free port).

    Skipped where PostgreSQL is not installed (Debian: ``apt-get install postgresql``) or psycopg is
    missing. PostgreSQL refuses to run as root, so under root it runs as ``nobody``.
    """
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg")
    folder = Path(tempfile.mkdtemp(prefix="omniserve-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["runuser", "-u", "nobody", "--"]
        shutil.chown(folder, "nobody")
    data, port = folder / "data", free_port()
    try:
        subprocess.run(
            [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "omniserve", "--no-sync"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://omniserve@127.0.0.1:{port}/postgres"
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=True, capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_retention_expires_by_age_in_one_transaction(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The store itself with a clock the test moves: old rows go with the next write; kept across reopening."""
    now = [1000.0]
    target = str(tmp_path / "r.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    kind = SqliteStore if backend == "sqlite" else PostgresStore

    def stored(name: str) -> StoredResponse:
        return StoredResponse(name, now[0], {"id": name}, [], [{"role": "user", "content": name}])

    async def run() -> None:
        store = kind(target, retention_seconds=60, max_stored=10, clock=lambda: now[0])
        await store._run(lambda db: db.execute("DELETE FROM responses"))
        await store.put(stored("a"))
        now[0] += 30
        await store.put(stored("b"))
        assert (await store.get("a")) is not None
        now[0] += 40  # a is 70 s old: past retention, though not yet deleted
        assert await store.get("a") is None and (await store.get("b")) is not None
        await store.put(stored("c"))
        rows = await store._run(lambda db: db.execute("SELECT id FROM responses ORDER BY id").fetchall())
        assert rows == [("b",), ("c",)]
        store.close()
        reopened = kind(target, retention_seconds=60, max_stored=10, clock=lambda: now[0])
        got = await reopened.get("c")
        assert got is not None and got.conversation == [{"role": "user", "content": "c"}]  # kept across restarts
        assert await reopened.delete("c") and not await reopened.delete("c")
        reopened.close()

    asyncio.run(run())


def test_replicas_share_a_postgresql_store(tiny_qwen2: Path, postgres_url: str) -> None:
    """Two servers on one PostgreSQL database: a conversation begun on one continues on the other."""
    replicas = [start_server(tiny_qwen2, name="plain", server={"responses_store": postgres_url}) for _ in range(2)]
    try:
        first, second = (srv.client() for srv in replicas)
        begun = first.responses.create(model="plain", input="My name is Ann.", max_output_tokens=3)
        alone = second.responses.create(model="plain", input="And mine?", max_output_tokens=3)
        continued = second.responses.create(
            model="plain", input="And mine?", previous_response_id=begun.id, max_output_tokens=3
        )
        assert begun.usage and alone.usage and continued.usage
        assert continued.usage.input_tokens > alone.usage.input_tokens + begun.usage.input_tokens - 3
        assert first.responses.retrieve(continued.id).previous_response_id == begun.id
        second.responses.delete(begun.id)
        with pytest.raises(openai.NotFoundError):
            first.responses.retrieve(begun.id)
        assert _sessions(postgres_url) >= 2
    finally:
        for srv in replicas:
            srv.stop()
    assert _sessions(postgres_url) == 0, "a stopped server left its PostgreSQL session open"


def _sessions(url: str) -> int:
    """Client sessions open on the database, other than this one."""
    import psycopg

    with psycopg.connect(url) as db:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return int(db.execute(query).fetchone()[0])


def test_a_store_that_cannot_be_opened_stops_start_up_without_showing_the_password(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable, match="cannot open the responses store"):
        open_store(f"sqlite://{tmp_path}/file/r.db", retention_seconds=1, max_stored=1)  # a file is no folder
    pytest.importorskip("psycopg")
    with pytest.raises(StoreUnavailable) as caught:
        open_store(f"postgresql://u:secret@127.0.0.1:{free_port()}/db", retention_seconds=1, max_stored=1)
    assert "secret" not in str(caught.value) and "u:***@127.0.0.1" in str(caught.value)


def test_store_off(tiny_qwen2: Path) -> None:
    srv = start_server(tiny_qwen2, name="plain", server={"responses_store": "none"})
    try:
        client = srv.client()
        out = client.responses.create(model="plain", input="hi", max_output_tokens=2)
        assert out.status in ("completed", "incomplete")
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.retrieve(out.id)
        assert "--responses-store none" in missing.value.message
        with pytest.raises(openai.BadRequestError) as off:
            client.responses.create(model="plain", input="hi", previous_response_id=out.id)
        assert off.value.code == "store_disabled" and off.value.param == "previous_response_id"
    finally:
        srv.stop()


# ---------------------------------------------------------------- bad input: OpenAI's error object, never a 500


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"reasoning": {"effort": "low"}}, "reasoning", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
        ({"include": ["message.output_text.logprobs"]}, "include", "unsupported_parameter"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice.type", "unsupported_parameter"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "unsupported_parameter"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input[0].content[0]",
            "unsupported_parameter",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
            "input[0].content[0].file_id",
            "unsupported_parameter",
        ),
        ({"input": [{"role": "user"}]}, "input[0].content", "invalid_request"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "invalid_request"),
        ({"input": []}, "input", "invalid_request"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
            "input[0].tool_call_id",
            "invalid_request",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
            "input[0].tool_calls[0].function.arguments",
            "invalid_request",
        ),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice", "invalid_request"),
        ({"max_output_tokens": 0}, "max_output_tokens", "invalid_request"),
        ({"frequency_penalty": 1}, "frequency_penalty", "unrecognized_argument"),
        ({"previous_response_id": "resp_nope"}, "previous_response_id", "response_not_found"),
    ],
)
def test_bad_requests_are_openai_errors(server: RunningServer, body: dict[str, Any], param: str, code: str) -> None:
    answer = httpx.post(server.base_url + "/v1/responses", json={"model": MODEL, "input": "hi", **body}, timeout=30)
    assert answer.status_code == (404 if code == "response_not_found" else 400), answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_an_unknown_model_and_unknown_ids_are_404s(server: RunningServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
