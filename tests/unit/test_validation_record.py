"""A validation pass is recorded per content hash and validator version, and reused only for those.

Whether a file was validated again is seen at the together SDK's ``check_file`` (the last step of a
full validation, reached only by a file our rules passed), wrapped, never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from epochwise import validate
from epochwise.validation_record import RECORD_FILE, validate_file_once, validator_version
from tests.helpers import count_check_file, make_fold


def test_a_pass_is_recorded_and_reused_for_the_same_bytes(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "games", "record-reuse")
    checked = count_check_file(monkeypatch)

    assert validate_file_once(fold / "train.jsonl") == []
    assert checked == ["train.jsonl"]
    [entry] = json.loads((fold / RECORD_FILE).read_text())["passed"]
    assert entry["sha256"] == hashlib.sha256((fold / "train.jsonl").read_bytes()).hexdigest()
    assert entry["validator"] == validator_version() and validator_version().startswith(
        validate.VALIDATOR_VERSION + "+"
    )
    assert validate_file_once(fold / "train.jsonl") == []
    assert checked == ["train.jsonl"]  # answered from the record: not parsed, not checked again


def test_other_bytes_are_validated_again_and_a_failure_is_never_recorded(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "games", "record-change")
    train = fold / "train.jsonl"
    checked = count_check_file(monkeypatch)
    assert validate_file_once(train) == []

    good = train.read_bytes()
    train.write_bytes(good.replace(b'"assistant"', b'"robot"', 1))  # other bytes
    for _ in range(2):  # a failing file is validated every time: its problems are always current
        problems = validate_file_once(train)
        assert {p.line for p in problems} == {1} and any("unknown role 'robot'" in p.reason for p in problems)

    train.write_bytes(good)  # back to the bytes that passed: the record vouches for them again
    assert validate_file_once(train) == []
    assert checked == ["train.jsonl"]


def test_a_validator_version_bump_or_other_options_invalidate_the_record(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "games", "record-version")
    train = fold / "train.jsonl"
    checked = count_check_file(monkeypatch)
    assert validate_file_once(train) == []
    assert validate_file_once(train, max_line_bytes=10_000) == []  # another line limit: another verdict
    assert len(checked) == 2

    monkeypatch.setattr(validate, "VALIDATOR_VERSION", validate.VALIDATOR_VERSION + "-next")
    assert validate_file_once(train) == []
    assert len(checked) == 3
    assert validate_file_once(train) == []  # the new version's pass is on record now
    assert len(checked) == 3


def test_a_broken_or_unreplaceable_record_only_costs_a_validation(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "games", "record-broken")
    train = fold / "train.jsonl"
    checked = count_check_file(monkeypatch)
    (fold / RECORD_FILE).write_text("{not json")
    assert validate_file_once(train) == []
    assert validate_file_once(train) == []
    assert len(checked) == 1  # the broken record was replaced by a good one

    # A record that cannot be replaced (here a directory in its place: the temporary file is written,
    # the rename fails, as root too): every run validates again, and no temporary file is left.
    (fold / RECORD_FILE).unlink()
    (fold / RECORD_FILE).mkdir()
    assert validate_file_once(train) == [] and validate_file_once(train) == []
    assert len(checked) == 3 and not any((fold / RECORD_FILE).iterdir())
    assert sorted(p.name for p in fold.iterdir()) == sorted([RECORD_FILE, "train.jsonl", "val.jsonl"])


def test_a_read_only_fold_validates_every_time_and_writes_nothing(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "games", "record-read-only")
    train = fold / "train.jsonl"
    checked = count_check_file(monkeypatch)
    os.chmod(fold, 0o555)
    try:
        if os.access(fold, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        assert validate_file_once(train) == [] and validate_file_once(train) == []
        assert len(checked) == 2 and not (fold / RECORD_FILE).exists()
    finally:
        os.chmod(fold, 0o755)
    assert sorted(p.name for p in fold.iterdir()) == ["train.jsonl", "val.jsonl"]  # no temp files


def test_missing_files_and_other_suffixes_are_reported_as_before(tmp_path: Path):
    assert [p.reason for p in validate_file_once(tmp_path / "nope.jsonl")] == ["no such file"]
    other = tmp_path / "train.csv"
    other.write_text("a,b\n")
    assert "expected a .jsonl file" in validate_file_once(other)[0].reason
    assert not (tmp_path / RECORD_FILE).exists()
