"""Validate a fine-tuning file once per content: a passed validation is recorded beside the file.

A rerun of a finished fold must not parse hundreds of MB again to learn what it already knew. When
`epochwise.validate.validate_file` finds no problem in a file, the file's sha256 is written, with the
validator's version and the options that change the verdict, to ``.validated.json`` in the file's
directory (the fold). The next validation of bytes with that sha256, by the same validator version
and options, is answered from the record: no parse, no ``together check_file``.

What invalidates a record:

* other bytes (any edit, a new file with the same name): another sha256;
* another validator: `validator_version` joins ``VALIDATOR_VERSION`` of `epochwise.validate` (bumped
  when a rule changes), a digest of that module's source (an edited rule counts even when nobody
  bumped the version) and the ``together`` SDK version (its ``check_file`` is part of the verdict);
* other options: ``max_line_bytes`` and whether ``together check_file`` ran.

Only passes are recorded: a failing file is validated again every time, so its ``path:line: reason``
list is always current. The record is written atomically (`epochwise.io.atomic_write_bytes`); a fold
that cannot be written (read-only) simply validates every time. A lost update between two runs writing
at once costs one validation more, never a wrong answer: every entry names the bytes it vouches for.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

import orjson

from epochwise import validate
from epochwise.io import DEFAULT_MAX_LINE_BYTES, atomic_write_bytes, file_identity, sha256_file
from epochwise.problems import Problem

RECORD_FILE = ".validated.json"
MAX_ENTRIES = 64  # newest first; a fold has two files, the rest are older versions of them


@functools.cache
def _module_digest() -> str:
    try:
        return hashlib.sha256(Path(validate.__file__).read_bytes()).hexdigest()[:16]
    except OSError:  # not installed as files (zipapp): the explicit version alone
        return "nosource"


@functools.cache
def _together_version() -> str:
    try:
        return importlib.metadata.version("together")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def validator_version() -> str:
    """What produced a verdict: ``<VALIDATOR_VERSION>+<validate.py digest>+together-<version>``."""
    return f"{validate.VALIDATOR_VERSION}+{_module_digest()}+together-{_together_version()}"


def _entry(sha256: str, max_line_bytes: int, together_check: bool, method: str = "sft") -> dict[str, object]:
    entry: dict[str, object] = {
        "sha256": sha256,
        "validator": validator_version(),
        "max_line_bytes": max_line_bytes,
        "together_check": together_check,
    }
    if method != "sft":  # the rows' format (`train.method`) is part of the verdict
        entry["method"] = method
    return entry


def record_path(path: Path | str) -> Path:
    """The record that vouches for ``path``: ``.validated.json`` in the same directory."""
    return Path(path).parent / RECORD_FILE


def _read(record: Path) -> list[dict[str, object]]:
    try:
        data = orjson.loads(record.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return []
    entries = data.get("passed") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def is_recorded(
    path: Path | str, sha256: str, max_line_bytes: int, together_check: bool = True, method: str = "sft"
) -> bool:
    """Whether a passed validation of exactly these bytes, by this validator and options, is on record."""
    return _entry(sha256, max_line_bytes, together_check, method) in _read(record_path(path))


def together_checked(path: Path | str, sha256: str) -> bool:
    """Whether these bytes passed a validation that included together's ``check_file`` (any line limit),
    by this validator: the check the SDK would run again before uploading them."""
    version = validator_version()
    return any(
        e.get("sha256") == sha256 and e.get("validator") == version and e.get("together_check") is True
        for e in _read(record_path(path))
    )


def record_pass(
    path: Path | str, sha256: str, max_line_bytes: int, together_check: bool = True, method: str = "sft"
) -> None:
    """Record that the bytes with ``sha256`` passed; best effort (a read-only fold records nothing)."""
    record = record_path(path)
    entry = _entry(sha256, max_line_bytes, together_check, method)
    entries = [entry, *(e for e in _read(record) if e != entry)][:MAX_ENTRIES]
    try:
        atomic_write_bytes(record, orjson.dumps({"passed": entries}, option=orjson.OPT_INDENT_2))
    except OSError:
        pass


def validate_file_once(
    path: Path | str,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    run_together_check: bool = True,
    method: str = "sft",
) -> list[Problem]:
    """`epochwise.validate.validate_method_file` for ``method``, answered from the record when these bytes
    already passed.

    The file is hashed with `sha256_file` (once per flow run inside `epochwise.io.hashes_once`). A pass
    is recorded only when the file did not change while it was hashed and validated.
    """
    def check() -> list[Problem]:
        return validate.validate_method_file(
            path, method, run_together_check=run_together_check, max_line_bytes=max_line_bytes
        )

    if Path(path).suffix != ".jsonl":  # refused by name alone: nothing to hash
        return check()
    try:
        before = file_identity(path)
        sha256 = sha256_file(path)
    except OSError:  # missing, a directory, unreadable: the validator words the problem
        return check()
    if is_recorded(path, sha256, max_line_bytes, run_together_check, method):
        return []
    problems = check()
    if not problems and file_identity(path) == before:
        record_pass(path, sha256, max_line_bytes, run_together_check, method)
    return problems
