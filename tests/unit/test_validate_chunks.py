"""`validate_file` reads a file in chunks and accepts chunks of plain conversation rows in bulk; every
file must still get exactly the problems a line-by-line check gives (the algorithm it replaced, written
out here from the public pieces: `jsonl_lines`, `parse_json_object`, `validate_rows`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

import epochwise.plain_rows as plain_rows
import epochwise.validate as validate
from epochwise.io import jsonl_lines, parse_json_object
from epochwise.problems import Problem, display_path
from epochwise.validate import validate_file, validate_rows


def line_by_line(path: Path, max_line_bytes: int) -> list[Problem]:
    shown = display_path(path)
    problems: list[Problem] = []
    rows = []
    with open(path, "rb") as handle:
        for number, raw in jsonl_lines(handle, shown, problems, max_line_bytes):
            row, reason = parse_json_object(raw)
            if reason is not None:
                problems.append(Problem(shown, number, reason))
            else:
                rows.append((number, row))
    issues, count, _ = validate_rows(shown, rows)
    problems += issues
    if count == 0 and not problems:
        problems.append(Problem(shown, None, "file is empty: at least 1 sample is needed"))
    return sorted(problems, key=lambda p: p.line or 0)


def msg(role: object, content: object = "x") -> dict:
    return {"role": role, "content": content}


PLAIN = [
    {"messages": [msg("user"), msg("assistant")]},
    {"messages": [msg("system"), msg("user"), msg("assistant"), msg("user"), msg("assistant")]},
    {"messages": [msg("user"), msg("assistant"), msg("tool"), msg("assistant")]},
    {"messages": [msg("user"), msg("assistant") | {"weight": 0}, msg("user"), msg("assistant") | {"weight": 1}]},
    {"messages": [msg("user"), msg("assistant") | {"thinking": "t", "reasoning": "", "reasoning_content": "r"}]},
    {"messages": [msg("user"), msg("assistant") | {"weight": -0}]},
]
GOOD = [*PLAIN, {"messages": [msg("user") | {"weight": 1.0}, msg("assistant")]}]  # weight 1.0: valid, not plain
BAD = [
    {"messages": [msg("assistant"), msg("user")]},
    {"messages": [msg("user"), msg("user"), msg("assistant")]},
    {"messages": [msg("user")]},
    {"messages": []},
    {"messages": [msg("user"), msg("bot")]},
    {"messages": [msg("user"), msg("assistant", 3)]},
    {"messages": [msg("user"), {"role": "assistant"}]},
    {"messages": [msg("user"), {"role": "assistant", "content": "a", "weight": 2}]},
    {"messages": [msg("user"), {"role": "assistant", "content": "a", "weight": True}]},
    {"messages": [msg("user"), {"role": "assistant", "content": "a", "weight": None}]},
    {"messages": [msg("user"), msg("assistant") | {"thinking": None}]},
    {"messages": [msg("user"), msg("assistant") | {"reasoning": 3}]},
    {"messages": [msg("user"), msg("assistant") | {"reasoning_content": ["r"]}]},
    {"messages": [msg("user"), msg("assistant")], "tools": 3},
    {"messages": [msg("user"), msg(["x"])]},
    {"messages": [msg("user"), msg(None)]},
    {"messages": [msg("user"), [1, 2]]},
    {"messages": "hi"},
    {"prompt": "a", "completion": "b"},
    {"text": "t"},
    {"messages": [msg("user"), msg("assistant")], "text": "x"},
]
RAW = [b"", b"  ", b"[1]", b"nope", b"\xff\xfe", b'{"messages": [', b"\r", b"null", b'{"text": "' + b"y" * 400 + b'"}']


@pytest.mark.parametrize("seed", range(6))
def test_chunked_validation_matches_line_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "train.jsonl"
    for case in range(60):

        def line() -> bytes:
            x = rng.random()
            if x < 0.8:
                return json.dumps(rng.choice(GOOD)).encode() + (b"\r" if rng.random() < 0.05 else b"")
            return json.dumps(rng.choice(BAD)).encode() if x < 0.93 else rng.choice(RAW)

        data = b"\n".join(line() for _ in range(rng.choice([0, 1, 3, 40, 200])))
        path.write_bytes(data + (b"\n" if data and rng.random() < 0.7 else b""))
        monkeypatch.setattr(validate, "CHUNK_BYTES", rng.choice([1, 50, 300, 4096, 2**20]))
        limit = rng.choice([150, 300, 10**6])
        assert validate_file(path, run_together_check=False, max_line_bytes=limit) == line_by_line(path, limit), case


def test_rows_split_across_lines_are_never_read_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two halves of a row on two lines, and two rows on a third: as a chunk they would parse as three
    rows; each line is judged on its own instead."""
    row = json.dumps(GOOD[0])
    half = row.index('{"role": "assistant"')
    path = tmp_path / "train.jsonl"
    path.write_text(f"{row[:half]}\n{row[half:]}\n{row}]], [[{row}\n{row}\n", encoding="utf-8")
    problems = validate_file(path, run_together_check=False)
    assert problems == line_by_line(path, 10**6)
    assert [p.line for p in problems] == [1, 2, 3]


def test_a_giant_line_between_plain_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "CHUNK_BYTES", 256)
    good = json.dumps(GOOD[1])
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([good] * 5 + ['{"text": "' + "z" * 5000 + '"}'] + [good] * 5) + "\n", encoding="utf-8")
    assert [(p.line, p.reason) for p in validate_file(path, run_together_check=False, max_line_bytes=1000)] == [
        (6, "line is 5013 bytes, over the limit of 1000")
    ]


def test_another_format_after_plain_chunks_names_the_first_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "CHUNK_BYTES", 128)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(GOOD[0])] * 20 + ['{"text": "t"}']) + "\n", encoding="utf-8")
    assert [str(p) for p in validate_file(path, run_together_check=False)] == [
        f"{display_path(path)}:21: general row in a conversation file (line 1); one format per file"
    ]


def test_plain_chunks_are_accepted_in_bulk_and_others_are_not() -> None:
    plain = "\n".join(json.dumps(row) for row in PLAIN)
    rows = len(PLAIN)
    assert validate._plain_chunk(bytearray(plain.encode() + b"\n"), 10**6, None) == (rows, "conversation")
    assert validate._plain_chunk(bytearray(plain.encode()), 10**6, None) == (rows, "conversation")  # no final newline
    assert validate._plain_chunk(bytearray(plain.encode()), 10**6, "conversation") == (rows, "conversation")
    assert validate._plain_chunk(bytearray(plain.encode()), 10**6, "general") is None  # not the file's format
    for other in (*BAD, *GOOD[len(PLAIN) :], GOOD[0] | {"tools": []}):
        assert validate._plain_chunk(bytearray(f"{plain}\n{json.dumps(other)}\n".encode()), 10**6, None) is None


INSTRUCTIONS = [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "ü \n"}]
TEXTS = [{"text": "t"}, {"text": ""}]


def test_plain_instruction_and_text_chunks_are_accepted_in_bulk() -> None:
    for rows, fmt in ((INSTRUCTIONS, "instruction"), (TEXTS, "general")):
        chunk = "\n".join(json.dumps(row) for row in rows).encode()
        assert validate._plain_chunk(bytearray(chunk), 10**6, None) == (2, fmt)
        assert validate._plain_chunk(bytearray(chunk), 10**6, fmt) == (2, fmt)
        assert validate._plain_chunk(bytearray(chunk), 10**6, "conversation") is None
    for other in (
        TEXTS[0],  # another format
        GOOD[0],
        {"prompt": "a", "completion": 3},
        {"prompt": "a"},
        {"prompt": "a", "completion": "b", "id": 1},  # an extra column: valid, but not plain
        {"prompt": "a", "completion": "b", "text": "c"},  # two formats
    ):
        chunk = "\n".join(json.dumps(row) for row in [*INSTRUCTIONS, other]).encode()
        assert validate._plain_chunk(bytearray(chunk), 10**6, None) is None, other


OTHER_FORMATS = [
    *INSTRUCTIONS,
    *TEXTS,
    {"prompt": "a", "completion": None},
    {"prompt": "a", "completion": "b", "id": 1},
    {"text": 3},
    {"text": "t", "source": "x"},
]


@pytest.mark.parametrize("seed", range(4))
def test_chunked_validation_of_each_format_matches_line_by_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    path = tmp_path / "train.jsonl"

    def line(good: list[dict]) -> bytes:
        x = rng.random()
        if x < 0.85:
            return json.dumps(rng.choice(good)).encode()
        return json.dumps(rng.choice([*BAD, *OTHER_FORMATS])).encode() if x < 0.97 else rng.choice(RAW)

    for case in range(60):
        good = rng.choice([GOOD, INSTRUCTIONS, TEXTS])
        data = b"\n".join(line(good) for _ in range(rng.choice([1, 3, 40, 200])))
        path.write_bytes(data + b"\n")
        monkeypatch.setattr(validate, "CHUNK_BYTES", rng.choice([1, 50, 300, 4096]))
        assert validate_file(path, run_together_check=False) == line_by_line(path, 10**6), case


USER, REPLY = b'{"role": "user", "content": "x"}', b'{"role": "assistant", "content": "y"}'


def chat(*messages: bytes, before: bytes = b"", after: bytes = b"") -> bytes:
    return before + b'{"messages": [' + b", ".join(messages) + b"]" + after + b"}"


def reply(content: bytes) -> bytes:
    return b'{"role": "assistant", "content": "' + content + b'"}'


# Lines where the bulk decoder (msgspec) and the line-by-line parser (orjson) could disagree: each must
# get the line-by-line verdict, whichever path reads it.
EDGE = [
    chat(USER, reply(rb"\ud800")),  # a lone high surrogate escape
    chat(USER, reply(rb"\udc00x")),  # a lone low surrogate escape
    chat(USER, reply(rb"\ud83d\ude00")),  # a surrogate pair: valid
    chat(USER, reply(rb"\u0000")),  # an escaped NUL: valid
    chat(USER, reply(b"\x7f")),  # a raw DEL is not a control character in JSON: valid
    chat(USER, reply(b"a\tb")),  # a raw tab in a string is
    chat(USER, reply(b"\x00")),
    chat(USER, reply(rb"\q")),  # an unknown escape
    chat(USER, reply(b"\xff")),  # invalid UTF-8 inside a string
    chat(USER, reply(b"\xed\xa0\x80")),  # a UTF-8-encoded surrogate
    chat(USER, reply(b"\xc0\xaf")),  # an overlong encoding
    b"\xef\xbb\xbf" + chat(USER, REPLY),  # a byte order mark
    chat(USER, REPLY, after=b', "messages": [' + REPLY + b"]"),  # duplicate keys: the last counts (bad)
    chat(REPLY, after=b', "messages": [' + USER + b", " + REPLY + b"]"),  # ... and here it is good
    chat(USER, b'{"role": "assistant", "role": "user", "content": "y"}'),
    chat(USER, b'{"role": "user", "role": "assistant", "content": "y"}'),
    chat(USER, rb'{"role": "assist\u0061nt", "content": "y"}'),  # an escaped role
    chat(USER, REPLY).replace(b"messages", rb"mess\u0061ges"),  # an escaped key
    chat(USER, b'{"role": "Assistant", "content": "y"}'),
    chat(USER, b'{"role": "assistant", "content": "y", "name": "bot"}'),  # an extra key: valid, not plain
    chat(USER, REPLY, before=b" ") + b" \t",
    chat(USER, REPLY) + b"\x0c",  # a form feed is not JSON whitespace
    chat(USER, REPLY) + b", {}",
    chat(USER, REPLY) + b" " + chat(USER, REPLY),  # two rows on one line
    chat(USER, REPLY) + b"], [" + chat(USER, REPLY),  # two rows that would make two wrappers of a chunk
]


@pytest.mark.parametrize("chunk_bytes", [1, 64, 256])
@pytest.mark.parametrize("index", range(len(EDGE)))
def test_edge_lines_get_the_line_by_line_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, index: int
) -> None:
    monkeypatch.setattr(validate, "CHUNK_BYTES", chunk_bytes)
    good = chat(USER, REPLY)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([good] * 3 + [EDGE[index]] + [good] * 3) + b"\n")
    assert validate_file(path, run_together_check=False) == line_by_line(path, 10**6)


@pytest.mark.parametrize("index", range(len(EDGE)))
def test_bulk_acceptance_implies_no_problems(tmp_path: Path, index: int) -> None:
    """Whatever the bulk path accepts, the line-by-line check finds nothing wrong with."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(EDGE[index] + b"\n")
    if validate._plain_chunk(bytearray(EDGE[index] + b"\n"), 10**6, None) is not None:
        assert line_by_line(path, 10**6) == []


def test_which_edge_rows_are_plain() -> None:
    plain = [chat(USER, rb'{"role": "assist\u0061nt", "content": "y"}'), chat(USER, reply(rb"\ud83d\ude00"))]
    for line in plain:
        assert validate._plain_chunk(bytearray(line), 10**6, None) == (1, "conversation")
    not_plain = [chat(USER, reply(rb"\ud800")), chat(USER, REPLY, after=b', "messages": [' + REPLY + b"]")]
    for line in not_plain:
        assert validate._plain_chunk(bytearray(line), 10**6, None) is None


def test_the_bulk_decoder_knows_the_roles_and_formats_the_rules_know() -> None:
    assert get_args(plain_rows.Role) == validate.ROLES
    assert plain_rows.PlainMessage.__struct_fields__ == ("role", "content", "weight", *validate.REASONING_KEYS)
    for fmt, row in plain_rows.PLAIN_ROWS.items():
        assert row.__struct_fields__ == validate.FORMAT_KEYS[fmt]


def test_only_full_chunks_take_the_bulk_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    decode = plain_rows.decode_plain

    def counted(wrapped: bytes | bytearray, rows: int, fmt: str) -> list | None:
        calls.append(rows)
        return decode(wrapped, rows, fmt)

    monkeypatch.setattr(validate, "CHUNK_BYTES", 128)
    monkeypatch.setattr(plain_rows, "decode_plain", counted)
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat(USER, REPLY) + b"\n")  # under a chunk: line by line
    assert validate_file(path, run_together_check=False) == [] and calls == []
    path.write_bytes(b"\n".join([chat(USER, REPLY)] * 20) + b"\n")
    assert validate_file(path, run_together_check=False) == [] and calls


def test_a_small_file_is_validated_without_msgspec(tmp_path: Path) -> None:
    """The CLI validating a fold file of a few rows does not pay for importing msgspec."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat(USER, REPLY) + b"\n")
    code = "import sys; from epochwise.validate import validate_file as v; "
    code += f"assert v({str(path)!r}, run_together_check=False) == []; print('msgspec' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
