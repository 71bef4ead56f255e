"""The synthetic tool and JSON tasks: their lines, their scoring, and the ``tools-synth`` suite end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omniserve.eval.datasets import TOOLS_BENCHMARK, stage_suite
from omniserve.eval.errors import InvalidSuite
from omniserve.eval.report import RunReport
from omniserve.eval.runner import EvalOptions, run_evaluation
from omniserve.eval.suites import load_suite
from omniserve.synth import write_synthetic
from omniserve.synth.evaluate import Reply, score_reply
from omniserve.synth.media import COLOURS
from omniserve.synth.tasks import COLOUR_RESPONSE_FORMAT, REPORT_COLOUR_TOOL
from omniserve.train.data import read_conversations
from omniserve.train.features import limits_for
from omniserve.train.parity import check_parity
from tests.conftest import RunningServer, start_server

TOOL_LINE = {
    "tools": [REPORT_COLOUR_TOOL],
    "answer": json.dumps({"name": "report_colour", "arguments": {"colour": "red"}}),
}
JSON_LINE = {"response_format": COLOUR_RESPONSE_FORMAT, "answer": json.dumps({"colour": "red"})}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(folder, seed=0, train_size=8, test_size=2, tasks=("tool_colour", "json_colour", "colour"))
    return folder


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tool_lines_carry_their_tools_and_end_in_a_call(synth: Path) -> None:
    tool_lines = [r for r in _lines(synth / "train.jsonl") if r["task"] == "tool_colour"]
    assert len(tool_lines) == 8
    for record in tool_lines:
        assert record["tools"] == [REPORT_COLOUR_TOOL]
        call = json.loads(record["answer"])
        assert call["name"] == "report_colour" and call["arguments"]["colour"] in COLOURS
        first_call = next(m for m in record["messages"] if m.get("tool_calls"))
        assert json.loads(first_call["tool_calls"][0]["function"]["arguments"]) == call["arguments"]
    # some training lines go on with the tool's result and a reply; the test split never does
    assert any(r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "tool" for r in tool_lines)
    for record in _lines(synth / "test.jsonl"):
        assert record["messages"][-1]["role"] == "assistant" and record["messages"][-2]["role"] == "user"


def test_json_lines_carry_their_schema_and_answer_matching_json(synth: Path) -> None:
    import jsonschema

    for record in (r for r in _lines(synth / "train.jsonl") if r["task"] == "json_colour"):
        assert record["response_format"] == COLOUR_RESPONSE_FORMAT
        answer = json.loads(record["messages"][-1]["content"])
        jsonschema.validate(answer, COLOUR_RESPONSE_FORMAT["json_schema"]["schema"])
        assert record["answer"] == record["messages"][-1]["content"]


def test_the_lines_train_on_what_the_demo_model_is_served(synth: Path) -> None:
    """Every line reads as training data and is token-identical to the served prompt (tools included)."""
    from omniserve.models.demo import demo_model_path
    from omniserve.templates.render import PromptRenderer

    data = synth / "train.jsonl"
    conversations = [c for c in read_conversations(data) if c.meta["task"] != "colour"][:6]
    assert any(c.tools for c in conversations)

    report = check_parity(PromptRenderer.from_pretrained(demo_model_path()), conversations, limits_for(data))

    assert report.ok, "\n".join(str(d) for d in report.differences)


@pytest.mark.parametrize(
    ("line", "reply", "checks"),
    [
        (TOOL_LINE, Reply("", (("report_colour", '{"colour": "red"}'),)), {"name": 1, "arguments": 1, "schema": 1}),
        (TOOL_LINE, Reply("", (("report_colour", '{"colour":"red"}'),)), {"name": 1, "arguments": 1, "schema": 1}),
        (TOOL_LINE, Reply("", (("report_colour", '{"colour": "blue"}'),)), {"name": 1, "arguments": 0, "schema": 1}),
        (TOOL_LINE, Reply("", (("report_colour", '{"colour": "pink"}'),)), {"name": 1, "arguments": 0, "schema": 0}),
        (
            TOOL_LINE,
            Reply("", (("report_colour", '{"colour": "red", "x": 1}'),)),
            {"name": 1, "arguments": 0, "schema": 0},
        ),
        (TOOL_LINE, Reply("", (("paint", '{"colour": "red"}'),)), {"name": 0, "arguments": 1, "schema": 0}),
        (TOOL_LINE, Reply("red"), {"name": 0, "arguments": 0, "schema": 0}),
        (
            TOOL_LINE,
            Reply("", (("report_colour", '{"colour": "red"}'), ("report_colour", '{"colour": "red"}'))),
            {"name": 0, "arguments": 0, "schema": 0},
        ),
        (JSON_LINE, Reply('{"colour": "red"}'), {"schema": 1, "value": 1}),
        (JSON_LINE, Reply(' {"colour":"red"}\n'), {"schema": 1, "value": 1}),
        (JSON_LINE, Reply('{"colour": "green"}'), {"schema": 1, "value": 0}),
        (JSON_LINE, Reply('{"color": "red"}'), {"schema": 0, "value": 0}),
        (JSON_LINE, Reply("red"), {"schema": 0, "value": 0}),
        ({"answer": "red"}, Reply(" Red\n"), {"exact": 1}),
    ],
    ids=[
        "call",
        "call-compact",
        "wrong-value",
        "off-schema",
        "extra-field",
        "wrong-name",
        "text-not-call",
        "two-calls",
        "json",
        "json-compact",
        "json-wrong-value",
        "json-wrong-key",
        "json-not-json",
        "plain",
    ],
)
def test_replies_are_scored_check_by_check(line: dict[str, Any], reply: Reply, checks: dict[str, int]) -> None:
    assert score_reply(line, reply) == {name: bool(ok) for name, ok in checks.items()}


def test_the_suite_is_built_in_and_staged_with_tools_and_schemas(tmp_path: Path) -> None:
    suite = load_suite("tools-synth")
    assert suite.format == "tools" and suite.scoring == "tool-call"

    staged = stage_suite(suite, tmp_path / "staged", limit=2, cache_dir=tmp_path / "cache")

    assert staged.benchmark == TOOLS_BENCHMARK and staged.totals == {"tool_colour": 2, "json_colour": 2}
    tool_item = _lines(tmp_path / "staged" / "tool_colour_test.jsonl")[0]
    assert tool_item["tools"] == [REPORT_COLOUR_TOOL] and tool_item["messages"][-1]["role"] == "user"
    image = tool_item["messages"][-1]["content"][0]["image_url"]["url"]
    assert Path(image).is_absolute() and Path(image).is_file()
    json_item = _lines(tmp_path / "staged" / "json_colour_test.jsonl")[0]
    assert json_item["response_format"] == COLOUR_RESPONSE_FORMAT


def test_a_tools_suite_must_be_scored_as_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: x\nformat: tools\nscoring: exact\n"
        "generate: {generator: omni-synth}\nsubsets: [tool_colour]\n"
    )
    with pytest.raises(InvalidSuite, match="format 'tools' cannot be scored with 'exact'"):
        load_suite(bad)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_server() -> Iterator[RunningServer]:
    from omniserve.models.demo import demo_model_path

    server = start_server(demo_model_path(), name="tiny-omni-demo", engine={"max_concurrency": 4, "max_queue": 64})
    yield server
    server.stop()


def _run(server: RunningServer, folder: Path) -> RunReport:
    options = EvalOptions(
        suites=["tools-synth"],
        url=f"{server.base_url}/v1",
        limit=3,
        concurrency=1,
        output=folder / "run",
        cache_dir=folder / "cache",
        progress=False,
    )
    return run_evaluation(options)


def test_the_suite_runs_against_the_demo_server_and_is_reported(demo_server: RunningServer, tmp_path: Path) -> None:
    report = _run(demo_server, tmp_path)

    result = report.suites["tools-synth"]
    assert result.status == "complete", result.errors
    assert result.benchmark == TOOLS_BENCHMARK and result.samples.scored == 6
    assert set(result.subsets) == {
        "tool_colour",
        "tool_colour.name",
        "tool_colour.arguments",
        "tool_colour.schema",
        "json_colour",
        "json_colour.schema",
        "json_colour.value",
    }
    # the response_format reached the server: constrained decoding makes every JSON answer valid
    assert result.subsets["json_colour.schema"].score == 1.0
    saved = RunReport.load(tmp_path / "run")
    assert saved.suites["tools-synth"].score == result.score
    assert "| tools-synth | tool_call_match |" in (tmp_path / "run" / "report.md").read_text()


def test_the_suite_sends_the_tools_and_scores_the_calls_it_gets_back(
    demo_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that always calls ``report_colour`` with red: the tools are in its prompt, and red items count."""
    from tests.scripted_engine import scripted_engine

    seen = scripted_engine(demo_server, monkeypatch)(
        '<tool_call>\n{"name": "report_colour", "arguments": {"colour": "red"}}\n</tool_call>'
    )

    report = _run(demo_server, tmp_path)

    result = report.suites["tools-synth"]
    items = _lines(tmp_path / "run" / "data" / "tools-synth" / "tool_colour_test.jsonl")
    reds = sum(json.loads(item["answer"])["arguments"]["colour"] == "red" for item in items)
    assert result.subsets["tool_colour.name"].score == 1.0 and result.subsets["tool_colour.schema"].score == 1.0
    assert result.subsets["tool_colour.arguments"].score == reds / len(items)
    assert result.subsets["json_colour"].score == 0.0  # a call is not a JSON answer
    kinds = [r.sampling.structured.kind if r.sampling.structured is not None else None for r in seen]
    # the strict tool is held to its schema once a call opens (a triggered structural tag); the JSON items
    # carry their response_format
    assert sorted(kinds, key=str) == ["json_schema"] * 3 + ["structural_tag"] * 3
    tool_prompts = [r.prompt.text or "" for r, kind in zip(seen, kinds, strict=True) if kind == "structural_tag"]
    assert all('"name": "report_colour"' in p and "<tools>" in p for p in tool_prompts)
