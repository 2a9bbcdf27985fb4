"""Records -> ChatML mapping, the seeded content-hash split, and bad input handling (pure functions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from epochwise.config.data import DataConfig, RecordMapping
from epochwise.fold import TRAIN_FILE, VAL_FILE
from epochwise.prepare import prepare
from epochwise.problems import InputError
from epochwise.records import MappingError, read_records, to_conversation
from epochwise.validate import validate_file

STORY = RecordMapping(
    system_prompt="sys",
    user_template="Generate a detailed socialized context for the following story:\n\n{story}",
    assistant_field="context",
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def games_config(**kwargs: object) -> DataConfig:
    return DataConfig(mapping=STORY, **kwargs)


# --- mapping -----------------------------------------------------------------------------------


def test_template_mapping_with_dict_reply_as_compact_json() -> None:
    record = {"story": "A and B play.", "context": {"winner": "A", "moves": [1, 2]}}
    assert to_conversation(record, STORY) == {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Generate a detailed socialized context for the following story:\n\nA and B play."},
            {"role": "assistant", "content": '{"winner":"A","moves":[1,2]}'},
        ]
    }


def test_record_with_messages_is_used_as_is_plus_system() -> None:
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_conversation(record, STORY)["messages"][0] == {"role": "system", "content": "sys"}
    assert to_conversation(record, RecordMapping())["messages"] == record["messages"]


def test_prompt_completion_record() -> None:
    out = to_conversation({"prompt": "q", "completion": "a"}, RecordMapping())
    assert out == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(
    "record, mapping, reason",
    [
        ({"context": "x"}, STORY, "missing field 'story' used by the user template"),
        ({"story": "s"}, STORY, "missing assistant field 'context'"),
        ({"story": "s", "context": ""}, STORY, "assistant field 'context' is empty"),
        ({"story": "s"}, RecordMapping(), "configure data.mapping.user_template"),
        ({"messages": []}, RecordMapping(), "'messages' must be a non-empty list"),
        ({"prompt": "q"}, RecordMapping(format="prompt_completion"), "missing field 'completion'"),
    ],
)
def test_unmappable_records_give_a_reason(record: dict, mapping: RecordMapping, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        to_conversation(record, mapping)


def test_literal_braces_in_template() -> None:
    mapping = RecordMapping(user_template="{{json}} {story}", assistant_field="a")
    assert to_conversation({"story": "s", "a": "x"}, mapping)["messages"][0]["content"] == "{json} s"


# --- reading records -----------------------------------------------------------------------------


def test_reads_jsonl_and_json_files_with_line_numbers(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"story": "1", "context": "x"}, {"story": "2", "context": "y"}])
    (tmp_path / "b.json").write_text('[\n  {"story": "3", "context": "z"},\n\n  {"story": "4", "context": "w"}\n]\n')
    (tmp_path / "c.json").write_text('\n{"story": "5", "context": "v"}')
    (tmp_path / "notes.txt").write_text("ignored")
    result = read_records(tmp_path)
    assert result.problems == []
    assert [(Path(r.path).name, r.line, r.data["story"]) for r in result.records] == [
        ("a.jsonl", 1, "1"), ("a.jsonl", 2, "2"), ("b.json", 2, "3"), ("b.json", 4, "4"), ("c.json", 2, "5"),
    ]


@pytest.mark.parametrize(
    "name, content, line, reason",
    [
        ("bad.jsonl", b'{"a": 1}\n{"a": \n', 2, "invalid JSON"),
        ("list.jsonl", b'{"a": 1}\n[1]\n', 2, "expected a JSON object, got an array"),
        ("latin1.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n', 2, "not valid UTF-8"),
        ("bad.json", b'[{"a": 1},\n {"a": }]', 2, "invalid JSON"),
        ("scalar.json", b'"text"', 1, "expected a JSON object or an array of objects, got a string"),
        ("elem.json", b'[{"a": 1},\n 3]', 2, "array element is a number, not a JSON object"),
        ("latin1.json", b'{"a":\n "caf\xe9"}', 2, "not valid UTF-8"),
    ],
)
def test_structural_problems_name_file_and_line(tmp_path: Path, name: str, content: bytes, line: int, reason: str) -> None:
    (tmp_path / name).write_bytes(content)
    problems = read_records(tmp_path).problems
    assert len(problems) == 1
    assert (Path(problems[0].path).name, problems[0].line) == (name, line)
    assert reason in problems[0].reason


def test_empty_inputs(tmp_path: Path) -> None:
    assert "holds no *.jsonl or *.json" in read_records(tmp_path).problems[0].reason
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.json").write_bytes(b"  \n")
    reasons = [p.reason for p in read_records(tmp_path).problems]
    assert reasons == ["file is empty", "file is empty"]
    assert read_records(tmp_path / "missing").problems[0].reason == "no such file or directory"


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    # A dangling symlink cannot be opened, even by root (chmod 000 would not stop root).
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    write_jsonl(tmp_path / "ok.jsonl", [{"story": "s", "context": "c"}])
    result = read_records(tmp_path)
    assert len(result.records) == 1
    assert [(Path(p.path).name, p.line) for p in result.problems] == [("dangling.jsonl", None)]
    assert result.problems[0].reason.startswith("cannot read file: No such file or directory")


def test_huge_single_line_is_reported_without_loading(tmp_path: Path) -> None:
    with open(tmp_path / "big.jsonl", "wb") as handle:
        handle.write(b'{"story": "' + b"s" * 2_000_000 + b'", "context": "c"}\n')
        handle.write(b'{"story": "s", "context": "c"}\n')
    result = read_records(tmp_path, max_line_bytes=1_000_000)
    assert len(result.records) == 1 and result.records[0].line == 2
    assert (result.problems[0].line, result.problems[0].reason) == (1, "line is 2000030 bytes, over the limit of 1000000")


# --- split and fold ----------------------------------------------------------------------------------


def make_records(tmp_path: Path, n: int = 50) -> Path:
    src = tmp_path / "records"
    src.mkdir()
    write_jsonl(src / "r.jsonl", [{"story": f"story {i}", "context": {"i": i}} for i in range(n)])
    return src


def test_fold_is_valid_and_split_90_10(tmp_path: Path) -> None:
    records = read_records(make_records(tmp_path, 50)).records
    summary = prepare(records, tmp_path / "fold", games_config())
    assert (summary.records_read, summary.train_written, summary.val_written) == (50, 45, 5)
    for name in (TRAIN_FILE, VAL_FILE):
        assert validate_file(tmp_path / "fold" / name) == []
    train = (tmp_path / "fold" / TRAIN_FILE).read_text().splitlines()
    val = (tmp_path / "fold" / VAL_FILE).read_text().splitlines()
    assert not set(train) & set(val)
    assert len(set(train) | set(val)) == 50


def test_rerun_is_byte_identical_and_independent_of_file_order_and_path(tmp_path: Path) -> None:
    rows = [{"story": f"story {i}", "context": {"i": i}} for i in range(40)]
    a = tmp_path / "a"
    a.mkdir()
    write_jsonl(a / "one.jsonl", rows)
    b = tmp_path / "b"
    b.mkdir()
    write_jsonl(b / "x.jsonl", rows[25:][::-1])
    write_jsonl(b / "y.jsonl", rows[:25])
    for name, src in (("f1", a), ("f2", a), ("f3", b)):
        prepare(read_records(src).records, tmp_path / name, games_config())
    for fname in (TRAIN_FILE, VAL_FILE):
        first = (tmp_path / "f1" / fname).read_bytes()
        assert first == (tmp_path / "f2" / fname).read_bytes() == (tmp_path / "f3" / fname).read_bytes()


def test_seed_changes_the_split(tmp_path: Path) -> None:
    records = read_records(make_records(tmp_path, 60)).records
    prepare(records, tmp_path / "s1", games_config(seed=1))
    prepare(records, tmp_path / "s2", games_config(seed=2))
    assert (tmp_path / "s1" / VAL_FILE).read_bytes() != (tmp_path / "s2" / VAL_FILE).read_bytes()


def test_val_ratio(tmp_path: Path) -> None:
    records = read_records(make_records(tmp_path, 20)).records
    summary = prepare(records, tmp_path / "fold", games_config(val_ratio=0.25))
    assert (summary.train_written, summary.val_written) == (15, 5)


def test_unmappable_records_are_skipped_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "records"
    src.mkdir()
    write_jsonl(src / "r.jsonl", [{"story": "a", "context": "x"}, {"context": "y"}, {"story": "b", "context": "z"}, {"story": "c"}])
    summary = prepare(read_records(src).records, tmp_path / "fold", games_config())
    assert (summary.train_written + summary.val_written, len(summary.skipped)) == (2, 2)
    assert [(p.line, p.reason) for p in summary.skipped] == [
        (2, "missing field 'story' used by the user template"),
        (4, "missing assistant field 'context'"),
    ]
    assert summary.skipped_by_reason() == {
        "missing field 'story' used by the user template": 1, "missing assistant field 'context'": 1,
    }


def test_strict_mode_fails_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "records"
    src.mkdir()
    write_jsonl(src / "r.jsonl", [{"story": "a", "context": "x"}, {"story": "b", "context": "y"}, {"context": "y"}])
    with pytest.raises(InputError) as info:
        prepare(read_records(src).records, tmp_path / "fold", games_config(strict=True))
    assert [p.line for p in info.value.problems] == [3]
    assert not (tmp_path / "fold" / TRAIN_FILE).exists()


def test_a_failure_keeps_the_previous_fold(tmp_path: Path) -> None:
    records = read_records(make_records(tmp_path, 10)).records
    prepare(records, tmp_path / "fold", games_config())
    before = {n: (tmp_path / "fold" / n).read_bytes() for n in (TRAIN_FILE, VAL_FILE)}
    with pytest.raises(InputError, match="no usable records"):
        prepare(records, tmp_path / "fold", DataConfig())  # no template: every record is skipped
    assert {n: (tmp_path / "fold" / n).read_bytes() for n in (TRAIN_FILE, VAL_FILE)} == before
    assert sorted(p.name for p in (tmp_path / "fold").iterdir()) == [TRAIN_FILE, VAL_FILE]  # no temp files left


def test_one_record_cannot_make_a_validation_split(tmp_path: Path) -> None:
    records = read_records(make_records(tmp_path, 1)).records
    with pytest.raises(InputError, match="validation split is empty"):
        prepare(records, tmp_path / "fold", games_config())
    assert not (tmp_path / "fold").exists()  # not even an empty directory


def test_example_records_make_a_valid_fold(tmp_path: Path, example_records: Path) -> None:
    from epochwise.config import load_settings

    repo = Path(__file__).resolve().parents[2]
    cfg = load_settings(repo / "epochwise.yaml", records_file=example_records / "epochwise.yaml").data
    summary = prepare(read_records(example_records).records, tmp_path / "games", cfg)
    assert summary.skipped == []
    assert summary.train_written + summary.val_written == summary.records_read >= 300
    assert validate_file(tmp_path / "games" / TRAIN_FILE) == []
