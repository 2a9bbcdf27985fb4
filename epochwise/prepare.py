"""Build a fold (``train.jsonl`` + ``val.jsonl``) from records: map, split, validate, write atomically.

The mapping's format picks the rows and the files (`epochwise.fold.METHOD_FILES`): chat rows go to
``train.jsonl`` / ``val.jsonl``, ``format: preference`` rows (DPO) to ``train_dpo.jsonl`` /
``val_dpo.jsonl``, ``format: prompt`` rows (GRPO) to ``train_grpo.jsonl`` / ``val_grpo.jsonl``, so
preparing preference rows into a fold that already holds chat rows keeps those (an ``sft -> dpo`` chain).

The split depends only on the seed and each conversation's content: every conversation is ranked by
``sha256(seed, canonical JSON)`` and the lowest ranks go to validation. Input file order and paths do
not matter, and rerunning on identical input writes byte-identical files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import orjson

from epochwise.config.data import DataConfig
from epochwise.fold import METHOD_FILES, TRAIN_FILE, VAL_FILE
from epochwise.io import atomic_write, gc_paused, sha256_file
from epochwise.problems import InputError, Problem, display_path
from epochwise.records import MappingError, SourceRecord, conversation_line, record_files, row_line
from epochwise.validate import ROW_CHECKS, message_problems

# The training method whose rows each mapping format writes (chat formats: sft).
FORMAT_METHOD = {"preference": "dpo", "prompt": "grpo"}


@dataclass(frozen=True, slots=True)
class Row:
    """One mapped conversation, serialised once, with its split rank."""

    rank: bytes  # sha256(seed, line)
    line: bytes  # compact JSON, no newline


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
    files: tuple[str, str] = (TRAIN_FILE, VAL_FILE)  # the (train, val) file names written

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.skipped).most_common())


def map_records(records: list[SourceRecord], config: DataConfig) -> tuple[list[Row], list[Problem]]:
    """Map and validate every record; returns the rows and one `Problem` per record that was skipped."""
    seed = str(config.seed).encode() + b"\0"
    rows: list[Row] = []
    skipped: list[Problem] = []
    method = FORMAT_METHOD.get(config.mapping.format)
    if method is not None:
        return _map_method_rows(records, config, seed, ROW_CHECKS[method])
    with gc_paused():
        for record in records:
            try:
                line = conversation_line(record.data, config.mapping)
            except MappingError as exc:
                skipped.append(Problem(record.path, record.line, str(exc)))
                continue
            # Conversations built from a template or prompt/completion are valid by construction; only
            # records that bring their own `messages` can break Together's rules.
            if "messages" in record.data:
                reasons = message_problems(orjson.loads(line)["messages"])
                if reasons:
                    skipped.append(Problem(record.path, record.line, "; ".join(reasons)))
                    continue
            rows.append(Row(hashlib.sha256(seed + line).digest(), line))
    return rows, skipped


def _map_method_rows(records: list[SourceRecord], config: DataConfig, seed: bytes, check) -> tuple[list[Row], list[Problem]]:
    """`map_records` for preference and prompt rows: each mapped row is checked by the method's own
    row rules (`epochwise.validate.ROW_CHECKS`), a record breaking them is skipped with the reasons."""
    rows: list[Row] = []
    skipped: list[Problem] = []
    with gc_paused():
        for record in records:
            try:
                line = row_line(record.data, config.mapping)
            except MappingError as exc:
                skipped.append(Problem(record.path, record.line, str(exc)))
                continue
            reasons = check(orjson.loads(line))
            if reasons:
                skipped.append(Problem(record.path, record.line, "; ".join(reasons)))
                continue
            rows.append(Row(hashlib.sha256(seed + line).digest(), line))
    return rows, skipped


def split_rows(rows: list[Row], val_ratio: float) -> FoldSplit:
    """Rank-ordered split: the ``round(n * val_ratio)`` lowest ranks (at least 1, at most n - 1) are val."""
    # Equal ranks mean equal bytes (sha256 of the line), so the rank alone orders deterministically.
    ordered = sorted(rows, key=attrgetter("rank"))
    n = len(ordered)
    n_val = 0
    if val_ratio > 0 and n >= 2:
        n_val = min(max(round(n * val_ratio), 1), n - 1)
    return FoldSplit(train=ordered[n_val:], val=ordered[:n_val])


def write_fold(fold_dir: Path | str, split: FoldSplit, names: tuple[str, str] = (TRAIN_FILE, VAL_FILE)) -> None:
    """Write both files atomically: temporary names first, renamed only once both are complete.

    Every row was validated in memory by `map_records` and serialised by orjson (one JSON object per
    line, UTF-8), so together's structural ``check_file`` is not re-run here; `epochwise validate` and
    the upload step run it.
    """
    fold_dir = Path(fold_dir)
    if not split.val:  # checked before the directory is made: bad input leaves nothing behind
        raise InputError([Problem(display_path(fold_dir), None, "validation split is empty: need at least 2 records and val_ratio > 0")])
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_name, val_name = names
    with atomic_write(fold_dir / train_name) as train_out, atomic_write(fold_dir / val_name) as val_out:
        for handle, rows in ((train_out, split.train), (val_out, split.val)):
            handle.write(b"\n".join(row.line for row in rows) + b"\n")


def prepare(records: list[SourceRecord], fold_dir: Path | str, config: DataConfig) -> PrepareSummary:
    """Map, split and write a fold; raises `InputError` (nothing written) when the input is unusable."""
    rows, skipped = map_records(records, config)
    if skipped and config.strict:
        raise InputError(skipped)
    if not rows:
        raise InputError(skipped + [Problem(display_path(fold_dir), None, "no usable records: every record was skipped")])
    split = split_rows(rows, config.val_ratio)
    names = METHOD_FILES[FORMAT_METHOD.get(config.mapping.format, "sft")]
    write_fold(fold_dir, split, names)
    return PrepareSummary(
        fold=display_path(fold_dir),
        records_read=len(records),
        train_written=len(split.train),
        val_written=len(split.val),
        skipped=skipped,
        files=names,
    )


def source_sha256(source: Path | str) -> str:
    """sha256 of the record files' bytes under ``source`` (the files `read_records` reads), independent of
    their names and order: the first link of a run report's lineage."""
    digests = sorted(bytes.fromhex(sha256_file(path)) for path in record_files(Path(source)))
    return hashlib.sha256(b"".join(digests)).hexdigest()
