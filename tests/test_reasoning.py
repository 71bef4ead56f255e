"""Reasoning blocks split from answers: the same split whether the reply streams in one piece or in many,
starting inside the block exactly when the rendered prompt opened it (read from Qwen3's published template)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from omniserve.reasoning import ReasoningSplitter, prompt_opens_block, split, template_thinks

QWEN3 = (Path(__file__).parent / "fixtures" / "chat_templates" / "qwen3.jinja").read_text()


@pytest.mark.parametrize(
    ("reply", "opened", "reasoning", "content"),
    [
        ("<think>\nthe sky scatters blue\n</think>\n\nIt is blue.", False, "the sky scatters blue", "It is blue."),
        ("  <think>a</think>b", False, "a", "b"),
        ("no block at all", False, None, "no block at all"),
        ("answer first <think>not reasoning</think>", False, None, "answer first <think>not reasoning</think>"),
        ("continued reasoning\n</think>\n\nfinal", True, "continued reasoning", "final"),
        ("cut off while thinking <thi", True, "cut off while thinking <thi", ""),
        ("<think>\n\n</think>\n\nplain", False, "", "plain"),
        ("<think>x</think>y</think>z", False, "x", "y</think>z"),
        ("<thinking>is not the tag", False, None, "<thinking>is not the tag"),
    ],
    ids=[
        "qwen3",
        "leading-space",
        "none",
        "late-tag",
        "opened-by-prompt",
        "unclosed",
        "empty",
        "two-closes",
        "near-tag",
    ],
)
def test_split_whole_and_streamed_agree(reply: str, opened: bool, reasoning: str | None, content: str) -> None:
    assert split(reply, starts_in_reasoning=opened) == (reasoning, content)
    for size in (1, 2, 3, 7):
        splitter = ReasoningSplitter(starts_in_reasoning=opened)
        pieces = [p for i in range(0, len(reply), size) for p in splitter.feed(reply[i : i + size])]
        pieces += splitter.finish()
        streamed_content = "".join(p.text for p in pieces if p.kind == "content")
        streamed_reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
        assert streamed_content == content, size
        assert streamed_reasoning.strip("\n") == (reasoning or ""), size


def test_tag_fragments_are_held_back_never_shown_as_text() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<th") == []  # may become <think>
    assert splitter.feed("ink>plan") == [piece("reasoning", "plan")]
    assert splitter.feed(" more</thi") == [piece("reasoning", " more")]  # may become </think>
    assert splitter.feed("nk>\n\nanswer") == [piece("content", "answer")]


def piece(kind: str, text: str) -> object:
    from omniserve.reasoning import Piece

    return Piece(kind, text)  # type: ignore[arg-type]


def test_qwen3_template_teaches_blocks_and_its_prompts_say_where_the_reply_starts() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert template_thinks(QWEN3)
    assert not template_thinks("{{ messages[0].content }}")
    template = ImmutableSandboxedEnvironment().from_string(QWEN3)
    messages = [{"role": "user", "content": "why is the sky blue?"}]
    thinking = template.render(messages=messages, add_generation_prompt=True)
    not_thinking = template.render(messages=messages, add_generation_prompt=True, enable_thinking=False)
    assert not prompt_opens_block(thinking)  # Qwen3 leaves the model to open the block
    assert not_thinking.endswith("<think>\n\n</think>\n\n") and not prompt_opens_block(not_thinking)
    assert prompt_opens_block("<|Assistant|><think>\n")  # DeepSeek-R1 opens it in the prompt


# ---------------------------------------------------------------- through the server, with the official client

from tests.conftest import RunningServer, start_server  # noqa: E402
from tests.scripted_engine import Script, scripted_engine  # noqa: E402
from tests.test_tools import CALL, WEATHER  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_qwen3: Path) -> Iterator[RunningServer]:
    """The tiny text model with Qwen3's published template, which teaches <think> blocks."""
    srv = start_server(tiny_qwen3, name="tiny-qwen3", engine={"max_concurrency": 4, "max_queue": 8})
    yield srv
    srv.stop()


@pytest.fixture
def scripted(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Script:
    return scripted_engine(server, monkeypatch)


THOUGHT = "<think>\nThe user wants the weather; I should call the tool.\n</think>\n\n"


def test_reasoning_comes_back_apart_from_the_answer(server: RunningServer, scripted: Script) -> None:
    scripted(THOUGHT + "It is sunny.")
    reply = server.client().chat.completions.create(
        model="tiny-qwen3", messages=[{"role": "user", "content": "weather?"}], max_tokens=40
    )
    message = reply.choices[0].message
    assert message.content == "It is sunny."
    assert message.reasoning_content == "The user wants the weather; I should call the tool."


def test_streamed_reasoning_then_content_then_a_call(server: RunningServer, scripted: Script) -> None:
    scripted(THOUGHT + "Checking.\n" + CALL, piece=3)
    stream = server.client().chat.completions.create(
        model="tiny-qwen3", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER], stream=True
    )
    chunks = [c for c in stream if c.choices]
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert reasoning.strip("\n") == "The user wants the weather; I should call the tool."
    assert content.strip() == "Checking."
    assert calls[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
    # no chunk mixes the two: a client showing content never shows reasoning
    assert not any(
        c.choices[0].delta.content and getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks
    )


def test_template_kwargs_reach_the_template_and_unknown_ones_are_400s(server: RunningServer, scripted: Script) -> None:
    seen = scripted("plain answer")
    client = server.client()
    reply = client.chat.completions.create(
        model="tiny-qwen3",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert seen[-1].prompt.text.endswith("<think>\n\n</think>\n\n")  # Qwen3's template closed the block itself
    assert reply.choices[0].message.content == "plain answer"  # and the reply is all answer
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None  # no block in the reply
    import openai

    for kwargs, param in (
        ({"enable_thinkin": True}, "chat_template_kwargs.enable_thinkin"),
        ({"messages": []}, "chat_template_kwargs.messages"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny-qwen3",
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"chat_template_kwargs": kwargs},
            )
        assert caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="enable_thinking"):  # the message lists what the template reads
        client.chat.completions.create(
            model="tiny-qwen3",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"chat_template_kwargs": {"thinking": True}},
        )
