"""The shared I/O blocks: the JSONL line loop and the atomic directory write."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from epochwise.io import atomic_dir, jsonl_lines
from epochwise.problems import Problem


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
