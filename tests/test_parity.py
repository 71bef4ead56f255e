"""``check-parity``: training encodings equal served prompts token for token, and a broken template is caught."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from omniserve.train.data import read_conversations
from omniserve.train.features import limits_for
from omniserve.train.parity import check_parity
from tests.test_train_support import MIXED_CONVERSATIONS, run_cli, write_jsonl, write_media, write_mixed_dataset


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mixed_dataset(tmp_path_factory.mktemp("parity"))


def test_every_modality_mix_is_token_identical(tiny_omni: Path, mixed_data: Path) -> None:
    from omniserve.templates.render import PromptRenderer

    conversations = read_conversations(mixed_data)
    report = check_parity(PromptRenderer.from_pretrained(tiny_omni), conversations, limits_for(mixed_data))

    assert report.ok, "\n".join(str(d) for d in report.differences)
    assert report.conversations == len(MIXED_CONVERSATIONS)
    # the tiny models' templates carry {% generation %} markers: they still decide the labels
    assert report.strategies == {"markers": len(MIXED_CONVERSATIONS)}
    expected_turns = sum(sum(m["role"] == "assistant" for m in c) for c in MIXED_CONVERSATIONS.values())
    assert report.turns == expected_turns


def test_cli_reports_success_with_exit_code_zero(tiny_omni: Path, mixed_data: Path) -> None:
    result = run_cli("check-parity", "--model", tiny_omni, "--data", mixed_data)

    assert result.exit_code == 0, result.output
    assert f"{len(MIXED_CONVERSATIONS)} conversations" in result.output
    assert "token-identical" in result.output


def test_text_only_model_is_token_identical(tiny_qwen2: Path, tmp_path: Path) -> None:
    text_only = [MIXED_CONVERSATIONS["text"], MIXED_CONVERSATIONS["text+system+multi-turn"]]
    data = write_jsonl(tmp_path / "text.jsonl", text_only)

    result = run_cli("check-parity", "--model", tiny_qwen2, "--data", data)

    assert result.exit_code == 0, result.output


def test_a_template_whose_generation_prompt_differs_fails_with_the_first_differing_token(
    tiny_omni: Path, tmp_path: Path
) -> None:
    """The classic train/serve skew: the served prompt opens the answer with tokens training never had."""
    model = tmp_path / "skewed"
    shutil.copytree(tiny_omni, model)
    template = (model / "chat_template.jinja").read_text()
    generation_prompt = "{{- '<|im_start|>assistant\\n' -}}"
    assert generation_prompt in template
    (model / "chat_template.jinja").write_text(
        template.replace(generation_prompt, "{{- '<|im_start|>assistant\\nSure! ' -}}")
    )
    write_media(tmp_path)
    data = write_jsonl(tmp_path / "data.jsonl", [MIXED_CONVERSATIONS["image"], MIXED_CONVERSATIONS["text"]])

    result = run_cli("check-parity", "--model", model, "--data", data)

    assert result.exit_code == 1
    assert f"{data}:1: assistant turn messages[1]: first differing token" in result.output
    assert f"{data}:2: assistant turn messages[1]: first differing token" in result.output
    assert "serving 'S" in result.output or "serving 'Sure" in result.output
    assert "2 turn(s) differ" in result.output


def test_bad_data_is_reported_by_file_and_line(tiny_omni: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )

    result = run_cli("check-parity", "--model", tiny_omni, "--data", data)

    assert result.exit_code == 2
    assert f"{data}:2: malformed JSON" in result.output
