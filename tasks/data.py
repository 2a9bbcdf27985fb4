"""Prefect tasks for the data steps: read records, build a fold, validate files.

Thin wrappers over the pure functions in `epochwise.records`, `epochwise.prepare` and `epochwise.validate`.
They hold records in memory and are cheap to recompute, so they are not cached (``NO_CACHE``: hashing
100k records for a cache key would cost more than the work).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from epochwise.config.data import MAX_LINE_BYTES, DataConfig
from epochwise.prepare import PrepareSummary, prepare
from epochwise.problems import InputError, Problem
from epochwise.records import SourceRecord, read_records
from epochwise.validate import validate_file, validate_prompt_file


@task(cache_policy=NO_CACHE)
def load_records(source: str, max_line_bytes: int) -> list[SourceRecord]:
    """Parse every record under ``source``; any broken file fails the run with ``path:line: reason``."""
    result = read_records(Path(source), max_line_bytes)
    if result.problems:
        raise InputError(result.problems)
    return result.records


@task(cache_policy=NO_CACHE)
def build_fold(records: list[SourceRecord], fold: str, config: DataConfig) -> PrepareSummary:
    """Map, split, validate and atomically write ``train.jsonl`` and ``val.jsonl``."""
    return prepare(records, Path(fold), config)


@task(cache_policy=NO_CACHE)
def validate_files(paths: list[str], max_line_bytes: int = MAX_LINE_BYTES, method: str = "sft") -> list[Problem]:
    """Validate fine-tuning JSONL files with Together's rules (GRPO: prompt rows); raises when any problem is found."""
    check = validate_prompt_file if method == "grpo" else validate_file
    problems = [p for path in paths for p in check(path, max_line_bytes=max_line_bytes)]
    if problems:
        raise InputError(problems)
    return problems
