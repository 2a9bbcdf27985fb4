"""File helpers: atomic file and directory writes, content hashes and a JSONL line reader that survives
hostile input."""

from __future__ import annotations

import contextlib
import contextvars
import gc
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from epochwise.problems import Problem

# A single JSONL line above this is almost certainly a broken file (a missing newline, a binary blob);
# Together's own limit per sample is far lower. 64 MiB keeps one line's memory bounded. The one default
# of `DataConfig.max_line_bytes` (``data.max_line_bytes``) and of the readers that take it.
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024

_CHUNK = 1 << 20  # 1 MiB


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in the same directory, renamed into place on success.

    A crash or exception leaves the previous file (or no file) and never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix so tools that dispatch on it (together's check_file) accept it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(target: Path, write: Callable[[Path], None], *, replace: bool) -> None:
    """Fill a temporary sibling directory with ``write(tmp)`` and rename it to ``target`` at the end.

    A crash or exception leaves no half-written ``target``. When ``target`` already exists, ``replace``
    decides: True removes it first (this result is the one wanted), False keeps it (a concurrent
    builder of the same content renamed its copy first) and drops this one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if replace:
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        else:
            with contextlib.suppress(OSError):  # another process renamed its copy first: keep that one
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as handle:
        handle.write(data)


# File identity -> sha256, while a `hashes_once` block is open (one flow run); None outside one.
_RUN_HASHES: contextvars.ContextVar[dict[tuple, str] | None] = contextvars.ContextVar("run_hashes", default=None)


@contextlib.contextmanager
def hashes_once() -> Iterator[None]:
    """Inside the block, `sha256_file` hashes each file once however many keys need it.

    A file is the same file while its resolved path, device, inode, size and modification time (ns) are
    unchanged; an atomic replace (new inode) or any write in place (new mtime or size) hashes it again.
    Meant to span one flow run, which reads its fold but does not rewrite it: the upload key, the
    epoch keys, the validation record, the Harmony manifest check and the report then share one pass
    over each file. Outside the block every call hashes (a long-lived process never trusts a stat
    from an earlier run). Nested blocks share the outer block's memo.
    """
    if _RUN_HASHES.get() is not None:
        yield
        return
    token = _RUN_HASHES.set({})
    try:
        yield
    finally:
        _RUN_HASHES.reset(token)


def file_identity(path: Path | str) -> tuple:
    """``(resolved path, device, inode, size, mtime_ns)``: what `hashes_once` keys a file's hash on."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes (about 1.5 GB/s here, so cheap next to any upload); inside
    `hashes_once`, computed once per file and then answered from the memo."""
    memo = _RUN_HASHES.get()
    if memo is None:
        return _sha256_bytes_of(path)
    identity = file_identity(path)
    found = memo.get(identity)
    if found is None:
        found = _sha256_bytes_of(path)
        if file_identity(path) == identity:  # not written to while it was read
            memo[identity] = found
    return found


def _sha256_bytes_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LineTooLong(Exception):
    """A line longer than the configured limit; its bytes were skipped, not loaded."""

    def __init__(self, size: int) -> None:
        self.size = size
        super().__init__(size)


def iter_lines(
    handle: BinaryIO, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes | LineTooLong]]:
    """Yield ``(line_number, raw_line)`` with 1-based numbers and the newline stripped.

    A line over ``max_line_bytes`` is yielded as a ``LineTooLong`` marker after skipping to its end in
    1 MiB chunks, so one giant line never sits in memory whole.
    """
    number = 0
    while True:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            while True:
                chunk = handle.readline(_CHUNK)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield number, LineTooLong(size)
            continue
        yield number, raw.rstrip(b"\r\n")


def jsonl_lines(
    handle: BinaryIO, shown: str, problems: list[Problem], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file as ``(line_number, raw_line)``; blank lines are skipped.

    A line over ``max_line_bytes`` becomes a `Problem` of ``shown`` (the path as displayed) in
    ``problems`` instead of being yielded.
    """
    for number, raw in iter_lines(handle, max_line_bytes):
        if isinstance(raw, LineTooLong):
            problems.append(Problem(shown, number, f"line is {raw.size} bytes, over the limit of {max_line_bytes}"))
            continue
        if raw.strip():
            yield number, raw


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects that are never cyclic garbage.

    With 100k records alive, each generation-2 collection rescans them all; pausing it made mapping
    about 2x faster on the 100k-record benchmark (bench/prepare.py).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_json_object(raw: bytes) -> tuple[Any, str | None]:
    """Parse one JSONL line into a dict, or return the reason it is not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not valid UTF-8"
        return None, f"invalid JSON: {exc.args[0] if exc.args else exc}"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {json_type(data)}"
    return data, None


def json_type(value: Any) -> str:
    """``an array``, ``a string``, ... : how a problem names a JSON value that is not an object."""
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
