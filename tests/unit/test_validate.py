"""The strict validator: a table of bad and valid files, each checked for its exact line and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epochwise.validate import validate_file

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}


def conv(*messages: dict) -> str:
    return json.dumps({"messages": list(messages)})


GOOD = conv(U, A)

# (case id, file lines, expected [(line, reason substring)] -- empty means valid)
CASES: list[tuple[str, list[str], list[tuple[int | None, str]]]] = [
    ("valid conversation", [GOOD, GOOD], []),
    ("valid with system", [conv(S, U, A)], []),
    ("valid multi-turn", [conv(U, A, U, A)], []),
    ("valid weights", [conv(U, {**A, "weight": 0}, U, {**A, "weight": 1})], []),
    ("valid instruction", [json.dumps({"prompt": "p", "completion": "c"})], []),
    ("valid general", [json.dumps({"text": "t"})], []),
    ("valid blank lines skipped", [GOOD, "", "   ", GOOD], []),
    ("valid unicode", [conv({"role": "user", "content": "héllo ✓ 你好"}, A)], []),
    (
        "valid preference",
        [json.dumps({"input": {"messages": [U]}, "preferred_output": [A], "non_preferred_output": [A]})],
        [],
    ),
    ("valid multimodal text part", [conv({"role": "user", "content": [{"type": "text", "text": "x"}]}, A)], []),
    ("invalid json", [GOOD, "{bad json"], [(2, "invalid JSON")]),
    ("array line", ["[1, 2]"], [(1, "expected a JSON object, got an array")]),
    ("string line", ['"just text"'], [(1, "expected a JSON object, got a string")]),
    ("number line", [GOOD, GOOD, "42"], [(3, "expected a JSON object, got a number")]),
    ("unknown format", [json.dumps({"foo": 1})], [(1, "no known format")]),
    ("two formats in one line", [json.dumps({"text": "t", "prompt": "p", "completion": "c"})], [(1, "matches two or more formats")]),
    ("mixed formats", [GOOD, json.dumps({"text": "t"})], [(2, "general row in a conversation file (line 1)")]),
    ("empty messages", [json.dumps({"messages": []})], [(1, "'messages' is empty")]),
    ("messages not a list", [json.dumps({"messages": "hi"})], [(1, "'messages' must be a list")]),
    ("message not an object", [json.dumps({"messages": ["hi", A]})], [(1, "messages[0] is not an object")]),
    ("missing role", [conv({"content": "x"}, A)], [(1, "messages[0] has no 'role'")]),
    ("unknown role", [conv({"role": "bot", "content": "x"}, A)], [(1, "unknown role 'bot'")]),
    ("missing content", [conv({"role": "user"}, A)], [(1, "messages[0] has no 'content'")]),
    ("content not a string", [conv({"role": "user", "content": 5}, A)], [(1, "content must be a string, got int")]),
    ("starts with assistant", [conv(A, U, A)], [(1, "messages[0] is 'assistant'; a conversation starts with")]),
    ("no alternation", [conv(U, U, A)], [(1, "messages[1] repeats role 'user'")]),
    ("two assistants", [conv(U, A, A)], [(1, "messages[2] repeats role 'assistant'")]),
    ("system not first", [conv(U, S, A)], [(1, "messages[1] is a system message")]),
    ("no assistant", [conv(S, U)], [(1, "no assistant message")]),
    ("weight 2", [conv(U, {**A, "weight": 2})], [(1, "weight must be 0 or 1")]),
    ("weight true", [conv(U, {**A, "weight": True})], [(1, "weight must be 0 or 1")]),
    ("prompt not a string", [json.dumps({"prompt": 1, "completion": "c"})], [(1, "'prompt' must be a string")]),
    ("text not a string", [json.dumps({"text": ["a"]})], [(1, "'text' must be a string")]),
    (
        "preference ending with assistant",
        [json.dumps({"input": {"messages": [U, A]}, "preferred_output": [A], "non_preferred_output": [A]})],
        [(1, "input.messages must not end with an assistant message")],
    ),
    (
        "preference with two outputs",
        [json.dumps({"input": {"messages": [U]}, "preferred_output": [A, A], "non_preferred_output": [A]})],
        [(1, "'preferred_output' must hold exactly one assistant message")],
    ),
    ("bad multimodal part", [conv({"role": "user", "content": [{"type": "audio"}]}, A)], [(1, "content[0] must be a 'text' or 'image_url' part")]),
    ("error on a late line", [GOOD] * 9 + [conv(U)], [(10, "no assistant message")]),
    ("only blank lines", ["", "  "], [(None, "file is empty")]),
    ("several problems", ["{", GOOD, "[]"], [(1, "invalid JSON"), (3, "expected a JSON object")]),
]


@pytest.mark.parametrize("lines, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validator_table(tmp_path: Path, lines: list[str], expected: list[tuple[int | None, str]]) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = validate_file(path)
    assert [p.line for p in problems] == [line for line, _ in expected], [str(p) for p in problems]
    for problem, (_, reason) in zip(problems, expected, strict=True):
        assert reason in problem.reason
        assert problem.path.endswith("train.jsonl")


def test_table_is_large_enough() -> None:
    assert len([c for c in CASES if c[2]]) >= 25
    assert len([c for c in CASES if not c[2]]) >= 5


def test_problem_prints_as_path_line_reason(tmp_path: Path) -> None:
    path = tmp_path / "val.jsonl"
    path.write_text(GOOD + "\n" + conv(U) + "\n", encoding="utf-8")
    (problem,) = validate_file(path)
    assert str(problem) == f"{path}:2: no assistant message: at least one is needed to train on"


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    problems = validate_file(path)
    assert [(p.line, p.reason) for p in problems] == [(2, "not valid UTF-8")]


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"")
    assert [(p.line, p.reason) for p in validate_file(path)] == [(None, "file is empty: at least 1 sample is needed")]


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    assert [p.reason for p in validate_file(tmp_path / "nope.jsonl")] == ["no such file"]
    other = tmp_path / "train.txt"
    other.write_text(GOOD)
    assert "expected a .jsonl file" in validate_file(other)[0].reason


def test_directory_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    assert [p.reason for p in validate_file(tmp_path / "dir.jsonl")] == ["is a directory, not a file"]


def test_huge_line_is_skipped_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    with open(path, "wb") as handle:
        handle.write(GOOD.encode() + b"\n")
        handle.write(b'{"text": "' + b"x" * 300_000 + b'"}\n')
        handle.write(GOOD.encode() + b"\n")
    problems = validate_file(path, max_line_bytes=100_000)
    assert [(p.line, p.reason) for p in problems] == [(2, "line is 300013 bytes, over the limit of 100000")]


def test_together_check_file_runs_on_valid_files(tmp_path: Path) -> None:
    """A file our rules accept is also accepted by together's own check_file (it runs last)."""
    from together.lib import check_file

    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "\n", encoding="utf-8")
    assert validate_file(path) == []
    assert check_file(path)["is_check_passed"] is True
