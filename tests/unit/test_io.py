"""The shared I/O blocks: the JSONL line loop, the atomic directory write and the per-run file hashes."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from epochwise.io import atomic_dir, atomic_write_bytes, hashes_once, jsonl_lines, sha256_file
from epochwise.problems import Problem
from tests.helpers import FileHashCounter


def test_jsonl_lines_skips_blanks_and_reports_over_long_lines_by_number():
    data = b'{"a": 1}\n\n   \r\n' + b"x" * 50 + b'\n{"b": 2}\r\n{"c": 3}'
    problems: list[Problem] = []
    lines = list(jsonl_lines(io.BytesIO(data), "f.jsonl", problems, max_line_bytes=20))
    assert lines == [(1, b'{"a": 1}'), (5, b'{"b": 2}'), (6, b'{"c": 3}')]
    assert problems == [Problem("f.jsonl", 4, "line is 51 bytes, over the limit of 20")]


def write_files(names: list[str]):
    def write(tmp: Path) -> None:
        for name in names:
            (tmp / name).write_text(name)

    return write


@pytest.mark.parametrize("replace", [True, False])
def test_atomic_dir_creates_the_target_and_leaves_no_temporary(tmp_path: Path, replace: bool):
    target = tmp_path / "sub" / "out"
    atomic_dir(target, write_files(["a", "b"]), replace=replace)
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"]
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_atomic_dir_replaces_or_keeps_an_existing_target(tmp_path: Path):
    target = tmp_path / "out"
    atomic_dir(target, write_files(["old"]), replace=True)
    atomic_dir(target, write_files(["other"]), replace=False)  # a concurrent builder's copy is kept
    assert [p.name for p in target.iterdir()] == ["old"]
    atomic_dir(target, write_files(["new"]), replace=True)
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_leaves_the_previous_target_and_no_temporary(tmp_path: Path):
    target = tmp_path / "out"
    atomic_dir(target, write_files(["old"]), replace=True)

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(target, fail, replace=True)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hashes_once_reads_each_file_once_inside_the_block_and_every_time_outside(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a"}\n' * 1000)
    hashes = FileHashCounter(monkeypatch, path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    hashes.reset()

    assert sha256_file(path) == sha256_file(path) == expected
    assert hashes.of(path) == 2  # no block: nothing is remembered
    hashes.reset()
    with hashes_once():
        assert {sha256_file(path), sha256_file(str(path)), sha256_file(tmp_path / "." / "train.jsonl")} == {expected}
        with hashes_once():  # nested: the outer run's memo
            assert sha256_file(path) == expected
        assert hashes.of(path) == 1
    assert sha256_file(path) == expected and hashes.of(path) == 2  # the block is over


def test_hashes_once_hashes_again_after_any_change_to_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"one\n")
    with hashes_once():
        assert sha256_file(path) == hashlib.sha256(b"one\n").hexdigest()
        atomic_write_bytes(path, b"two\n")  # same size, new inode (atomic replace)
        assert sha256_file(path) == hashlib.sha256(b"two\n").hexdigest()
        with open(path, "ab") as handle:  # written in place: new size
            handle.write(b"three\n")
        assert sha256_file(path) == hashlib.sha256(b"two\nthree\n").hexdigest()
        with open(path, "r+b") as handle:  # same size, same inode, later mtime
            handle.write(b"TWO\n")
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
        assert sha256_file(path) == hashlib.sha256(b"TWO\nthree\n").hexdigest()
