"""Validation of DPO preference rows and GRPO prompt rows (`validate_method_file`), and the CLI's
``epochwise validate --method``: every rule, reported as ``path:line: reason``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.validate import validate_method_file

SYSTEM = {"role": "system", "content": "s"}
USER = {"role": "user", "content": "q"}
GOOD = {"role": "assistant", "content": "good"}
BAD = {"role": "assistant", "content": "bad"}


def pref(**changes: object) -> dict:
    row: dict = {"input": {"messages": [SYSTEM, USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]}
    row.update(changes)
    return row


def write(tmp_path: Path, rows: list[object], name: str = "train_dpo.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def reasons(path: Path, method: str) -> list[str]:
    return [f"{p.line}: {p.reason}" for p in validate_method_file(path, method, run_together_check=False)]


def test_valid_preference_rows_pass_including_together_check(tmp_path):
    assert validate_method_file(write(tmp_path, [pref(), pref()]), "dpo") == []


@pytest.mark.parametrize(
    "row, reason",
    [
        (pref(input={"messages": [USER, GOOD]}), "input.messages ends with an assistant message"),
        (pref(input=[USER]), "'input' must be an object with 'messages'"),
        (pref(input={"messages": []}), "input: 'messages' is empty"),
        (pref(input={"messages": [{"role": "robot", "content": "x"}]}), "input: messages[0] has unknown role 'robot'"),
        (pref(preferred_output=[GOOD, GOOD]), "'preferred_output' holds 2 messages; it must hold exactly one"),
        (pref(preferred_output=[]), "'preferred_output' holds 0 messages"),
        (pref(non_preferred_output=[USER]), "non_preferred_output[0] has role 'user'; it must be 'assistant'"),
        (
            pref(non_preferred_output=GOOD),
            "'non_preferred_output' must be a list holding one assistant message, got dict",
        ),
        (pref(preferred_output=[{"role": "assistant"}]), "preferred_output[0] has no 'content'"),
        (pref(preferred_output=[{"role": "assistant", "content": ""}]), "preferred_output[0] content is empty"),
        (
            pref(preferred_output=[{"role": "assistant", "content": 3}]),
            "preferred_output[0] content must be a string, got int",
        ),
        (pref(preferred_output=["yes"]), "preferred_output[0] is not an object"),
        (pref(score=1.0), "extra column(s) 'score': a preference row holds only"),
        ({"input": {"messages": [USER]}, "preferred_output": [GOOD]}, "missing 'non_preferred_output'"),
        ({"messages": [USER, GOOD]}, "a chat row ('messages'), but DPO trains on preference rows"),
    ],
)
def test_each_preference_rule_names_the_line(tmp_path, row, reason):
    path = write(tmp_path, [pref(), row])
    found = reasons(path, "dpo")
    assert any(r.startswith("2: ") and reason in r for r in found), found


def test_every_bad_line_is_reported_with_the_path(tmp_path):
    path = write(tmp_path, [pref(score=1), "not json", pref(preferred_output=[]), "[1]"])
    problems = validate_method_file(path, "dpo", run_together_check=False)
    assert [p.line for p in problems] == [1, 2, 3, 4]
    assert all(p.path == str(path) and str(p).startswith(f"{path}:{p.line}: ") for p in problems), problems


def test_a_chat_file_given_to_dpo_says_which_format_was_expected(tmp_path):
    path = write(tmp_path, [{"messages": [USER, GOOD]}], "train.jsonl")
    (problem,) = validate_method_file(path, "dpo")
    assert problem.line == 1
    assert "DPO trains on preference rows" in problem.reason and '"preferred_output"' in problem.reason


def test_a_whole_file_of_another_methods_rows_is_one_problem_a_mixed_file_one_per_line(tmp_path):
    chat = {"messages": [USER, GOOD]}
    (whole,) = validate_method_file(write(tmp_path, [chat] * 5, "train.jsonl"), "dpo")
    assert (
        whole.line == 1
        and whole.reason.endswith("(every line, 5 of 5)")
        and "DPO trains on preference rows" in whole.reason
    )
    (as_grpo,) = validate_method_file(write(tmp_path, [chat] * 3, "train.jsonl"), "grpo")
    assert "ends with an assistant message (a chat row?)" in as_grpo.reason and "(every line, 3 of 3)" in as_grpo.reason
    mixed = validate_method_file(write(tmp_path, [pref(), chat, chat], "mixed.jsonl"), "dpo")
    assert [p.line for p in mixed] == [2, 3] and all("a chat row" in p.reason for p in mixed)


def test_a_preference_file_given_to_sft_names_method_dpo(tmp_path):
    path = write(tmp_path, [pref(), pref()], "train.jsonl")
    (problem,) = validate_method_file(path, "sft", run_together_check=False)
    assert (problem.line, problem.reason) == (
        1,
        "preference rows: train them with --method dpo (SFT trains on chat rows)",
    )


def test_missing_empty_and_non_jsonl_files(tmp_path):
    assert (
        "no such file (dpo trains on preference rows" in validate_method_file(tmp_path / "none.jsonl", "dpo")[0].reason
    )
    (tmp_path / "empty.jsonl").write_text("")
    assert validate_method_file(tmp_path / "empty.jsonl", "dpo")[0].reason.startswith("file is empty")
    (tmp_path / "rows.json").write_text("{}")
    assert "expected a .jsonl file" in validate_method_file(tmp_path / "rows.json", "grpo")[0].reason


# --- GRPO prompt rows ------------------------------------------------------------------------------


def test_valid_prompt_rows_with_extra_columns_pass(tmp_path):
    rows = [{"messages": [SYSTEM, USER], "answer": "rock", "meta": {"k": [1]}}, {"messages": [USER]}]
    assert validate_method_file(write(tmp_path, rows, "train_grpo.jsonl"), "grpo", run_together_check=False) == []


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [SYSTEM, USER, GOOD]}, "ends with an assistant message (a chat row?)"),
        ({"messages": [SYSTEM]}, "no user message"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": "q"}, "'messages' must be a list"),
        ({"messages": [USER, USER]}, "repeats role 'user'"),
        ({"prompt": "q", "answer": "a"}, "no 'messages': GRPO trains on prompt rows"),
        (pref(), "a preference row, but GRPO trains on prompt rows"),
    ],
)
def test_each_prompt_rule_names_the_line(tmp_path, row, reason):
    path = write(tmp_path, [{"messages": [USER]}, row], "train_grpo.jsonl")
    found = reasons(path, "grpo")
    assert any(r.startswith("2: ") and reason in r for r in found), found


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_validate_method_picks_the_validator(tmp_path):
    runner = CliRunner()
    prefs = write(tmp_path, [pref()])
    chat = write(tmp_path, [{"messages": [USER, GOOD]}], "train.jsonl")

    ok = runner.invoke(app, ["validate", str(prefs), "--method", "dpo"])
    assert ok.exit_code == 0 and "train_dpo.jsonl: ok" in ok.output

    wrong = runner.invoke(app, ["validate", str(chat), "--method", "dpo"])
    assert wrong.exit_code != 0 and "Traceback" not in wrong.output
    assert "train.jsonl:1: a chat row ('messages'), but DPO trains on preference rows" in wrong.output

    as_sft = runner.invoke(app, ["validate", str(prefs)])  # default method: sft
    assert as_sft.exit_code != 0 and "train them with --method dpo" in as_sft.output

    bad_method = runner.invoke(app, ["validate", str(prefs), "--method", "ppo"])
    assert bad_method.exit_code != 0 and "--method" in bad_method.output
