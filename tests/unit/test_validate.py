"""The strict validator: a table of bad and valid files, each checked for its exact line and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epochwise.validate import validate_file

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}
CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}
T = {"role": "tool", "tool_call_id": "c1", "content": "42"}
PNG = "data:image/png;base64,iVBORw0KGgo="


def image(url: str = PNG) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


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
    ("valid tool call and result", [conv(U, CALL, T, A)], []),
    ("valid parallel tool results", [conv(U, CALL, T, T, A)], []),
    ("valid tool_calls with null content", [conv(U, {**CALL, "content": None}, T, A)], []),
    ("valid tools list", [json.dumps({"tools": [{"type": "function"}], "messages": [U, A]})], []),
    (
        "valid reasoning strings",
        [conv(U, {**A, "reasoning": "r"}, U, {**A, "reasoning_content": "r", "thinking": "t"})],
        [],
    ),
    (
        "valid image in a user message",
        [conv({"role": "user", "content": [{"type": "text", "text": "x"}, image()]}, A)],
        [],
    ),
    ("valid ten images", [conv({"role": "user", "content": [image()] * 10}, A)], []),
    ("invalid json", [GOOD, "{bad json"], [(2, "invalid JSON")]),
    ("array line", ["[1, 2]"], [(1, "expected a JSON object, got an array")]),
    ("string line", ['"just text"'], [(1, "expected a JSON object, got a string")]),
    ("number line", [GOOD, GOOD, "42"], [(3, "expected a JSON object, got a number")]),
    ("unknown format", [json.dumps({"foo": 1})], [(1, "no known format")]),
    (
        "two formats in one line",
        [json.dumps({"text": "t", "prompt": "p", "completion": "c"})],
        [(1, "matches two or more formats")],
    ),
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
    (
        "bad multimodal part",
        [conv({"role": "user", "content": [{"type": "audio"}]}, A)],
        [(1, "content[0] must be a 'text' or 'image_url' part")],
    ),
    # Tools: a tool result answers an assistant's tool call (Together's function-calling data format).
    (
        "tool after user",
        [conv(U, T, A)],
        [(1, "messages[1] is a tool message after 'user'; a tool result follows an assistant or tool message")],
    ),
    ("tool after system", [conv(S, T, A)], [(1, "messages[1] is a tool message after 'system'")]),
    ("tool first", [conv(T, A)], [(1, "messages[0] is 'tool'; a conversation starts with 'system' or 'user'")]),
    (
        "tool_calls not a list",
        [conv(U, {"role": "assistant", "tool_calls": "f()"}, T, A)],
        [(1, "messages[1].tool_calls must be a non-empty list of objects"), (1, "messages[1] has no 'content'")],
    ),
    (
        "tool_calls empty, no content",
        [conv(U, {"role": "assistant", "tool_calls": []}, U, A)],
        [(1, "messages[1].tool_calls must be a non-empty list of objects"), (1, "messages[1] has no 'content'")],
    ),
    (
        "user with null content",
        [conv({"role": "user", "content": None}, A)],
        [(1, "messages[0] content must be a string, got null")],
    ),
    (
        "tools not a list",
        [json.dumps({"tools": {"type": "function"}, "messages": [U, A]})],
        [(1, "'tools' must be a list of tool definitions")],
    ),
    # Reasoning fine-tuning: the chain of thought is a string beside the assistant's content.
    (
        "reasoning not a string",
        [conv(U, {**A, "reasoning": ["step"]})],
        [(1, "messages[1].reasoning must be a string, got list")],
    ),
    (
        "reasoning_content not a string",
        [conv(U, {**A, "reasoning_content": 3})],
        [(1, "messages[1].reasoning_content must be a string, got int")],
    ),
    (
        "thinking not a string",
        [conv(U, {**A, "thinking": {"t": 1}})],
        [(1, "messages[1].thinking must be a string, got dict")],
    ),
    ("thinking null", [conv(U, {**A, "thinking": None})], [(1, "messages[1].thinking must be a string, got null")]),
    # Vision fine-tuning: base64 JPEG/PNG/WEBP data URLs, user messages only, at most 10 of 10 MB each.
    (
        "image in an assistant message",
        [conv(U, {"role": "assistant", "content": [image()]})],
        [(1, "messages[1].content[0] is an image in a 'assistant' message; only user messages may hold images")],
    ),
    (
        "image in a system message",
        [conv({"role": "system", "content": [image()]}, U, A)],
        [(1, "messages[0].content[0] is an image in a 'system' message")],
    ),
    (
        "image as an http URL",
        [conv({"role": "user", "content": [image("https://x/y.png")]}, A)],
        [(1, "messages[0].content[0] image_url.url must be a base64 data URL")],
    ),
    (
        "image as a gif",
        [conv({"role": "user", "content": [image("data:image/gif;base64,R0lG")]}, A)],
        [(1, "image_url.url must be a base64 data URL")],
    ),
    (
        "image over 10 MB",
        [conv({"role": "user", "content": [image(PNG + "A" * (14 * 2**20))]}, A)],
        [(1, "messages[0].content[0] image is over 10 MB")],
    ),
    (
        "eleven images",
        [conv({"role": "user", "content": [image()] * 11}, A)],
        [(1, "11 images in one example; at most 10 are allowed")],
    ),
    (
        "text part without text",
        [conv({"role": "user", "content": [{"type": "text"}]}, A)],
        [(1, "messages[0].content[0] is a text part without a string 'text'")],
    ),
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
