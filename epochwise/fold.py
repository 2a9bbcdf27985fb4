"""Build a fold (``train.jsonl`` + ``val.jsonl``) from records: map, split, validate, write atomically.

The split depends only on the seed and each conversation's content: every conversation is ranked by
``sha256(seed, canonical JSON)`` and the lowest ranks go to validation. Input file order and paths do
not matter, and rerunning on identical input writes byte-identical files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from epochwise.config.data import DataConfig
from epochwise.io import atomic_write
from epochwise.problems import InputError, Problem, display_path
from epochwise.records import MappingError, SourceRecord, to_conversation
from epochwise.validate import message_problems, together_check

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"


@dataclass(frozen=True)
class Row:
    """One mapped conversation, serialised once, with its split rank and origin."""

    rank: bytes
    line: bytes  # compact JSON, no newline
    origin: str  # "path:line" of the source record


@dataclass
class FoldSplit:
    """Conversations assigned to train and validation, in rank order."""

    train: list[Row]
    val: list[Row]


@dataclass
class PrepareSummary:
    """What `prepare` did; printed by the CLI and published as a Prefect artifact."""

    fold: str
    records_read: int
    train_written: int
    val_written: int
    skipped: list[Problem] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.skipped).most_common())


def map_records(records: list[SourceRecord], config: DataConfig) -> tuple[list[Row], list[Problem]]:
    """Map and validate every record; returns the rows and one `Problem` per record that was skipped."""
    seed = str(config.seed).encode() + b"\0"
    rows: list[Row] = []
    skipped: list[Problem] = []
    for record in records:
        try:
            conversation = to_conversation(record.data, config.mapping)
        except MappingError as exc:
            skipped.append(Problem(record.path, record.line, str(exc)))
            continue
        reasons = message_problems(conversation["messages"])
        if reasons:
            skipped.append(Problem(record.path, record.line, "; ".join(reasons)))
            continue
        line = orjson.dumps(conversation)
        rows.append(Row(hashlib.sha256(seed + line).digest(), line, f"{record.path}:{record.line}"))
    return rows, skipped


def split_rows(rows: list[Row], val_ratio: float) -> FoldSplit:
    """Rank-ordered split: the ``round(n * val_ratio)`` lowest ranks (at least 1, at most n - 1) are val."""
    ordered = sorted(rows, key=lambda r: (r.rank, r.line))
    n = len(ordered)
    n_val = 0
    if val_ratio > 0 and n >= 2:
        n_val = min(max(round(n * val_ratio), 1), n - 1)
    return FoldSplit(train=ordered[n_val:], val=ordered[:n_val])


def write_fold(fold_dir: Path | str, split: FoldSplit) -> None:
    """Write both files atomically; each is checked by together's ``check_file`` before it replaces anything.

    Both files are written to temporary names first and renamed only once both passed, so a failure
    leaves the previous fold untouched.
    """
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    if not split.val:
        raise InputError([Problem(display_path(fold_dir), None, "validation split is empty: need at least 2 records and val_ratio > 0")])
    with atomic_write(fold_dir / TRAIN_FILE) as train_out, atomic_write(fold_dir / VAL_FILE) as val_out:
        for handle, rows in ((train_out, split.train), (val_out, split.val)):
            handle.write(b"".join(row.line + b"\n" for row in rows))
            handle.flush()
            problems = together_check(Path(handle.name), display_path(Path(handle.name)))
            if problems:
                raise InputError(problems)


def prepare(records: list[SourceRecord], fold_dir: Path | str, config: DataConfig) -> PrepareSummary:
    """Map, split and write a fold; raises `InputError` (nothing written) when the input is unusable."""
    rows, skipped = map_records(records, config)
    if skipped and config.strict:
        raise InputError(skipped)
    if not rows:
        raise InputError(skipped + [Problem(display_path(fold_dir), None, "no usable records: every record was skipped")])
    split = split_rows(rows, config.val_ratio)
    write_fold(fold_dir, split)
    return PrepareSummary(
        fold=display_path(fold_dir),
        records_read=len(records),
        train_written=len(split.train),
        val_written=len(split.val),
        skipped=skipped,
    )
