"""Check a config once per content: the few settings a quick command needs, kept from an earlier check.

``epochwise validate`` needs two settings (``data.max_line_bytes``, ``train.method``), but loading them
means parsing YAML and validating every section of `Settings` (half of the command's own run time).
Once a full load of the same inputs has passed, the values it produced are recorded in the user cache
(``$XDG_CACHE_HOME/epochwise/settings``, ``~/.cache/epochwise/settings`` when unset), under a digest of
everything the load reads:

* the bytes of the config file and of each preset file (any edit is another digest), and their paths;
* the ``EPOCHWISE_*`` variables and the command's flags;
* the settings code: the source of every ``epochwise/config`` module (an edited default or rule counts
  even when no version was bumped) and pydantic's version;
* the dotted paths asked for.

Only a passed load is recorded: a config with a mistake is loaded in full every time, so its
``file:line: reason`` messages are always current. The record is written atomically; a cache that
cannot be written (read-only home) simply loads in full every time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from epochwise.io import atomic_write_bytes

RECORD_VERSION = "1"


def record_dir() -> Path:
    """``$XDG_CACHE_HOME/epochwise/settings`` (``~/.cache/epochwise/settings`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "epochwise" / "settings"


@functools.cache
def _code_digest() -> str:
    """The settings code: every ``epochwise/config`` module's source, and pydantic's version."""
    import pydantic.version

    digest = hashlib.sha256(pydantic.version.VERSION.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def inputs_digest(
    config_file: Path | None,
    preset_files: list[Path],
    environment: dict[str, str],
    flags: dict[str, Any],
    paths: tuple[str, ...],
) -> str:
    """A digest of everything a settings load of ``paths`` reads (see the module docstring)."""
    files = []
    for path in [config_file, *preset_files]:
        if path is not None:
            files.append([str(Path(path).resolve()), hashlib.sha256(Path(path).read_bytes()).hexdigest()])
    body = {
        "version": RECORD_VERSION,
        "code": _code_digest(),
        "config": files[0] if config_file is not None else None,
        "presets": files[1:] if config_file is not None else files,
        "environment": sorted(environment.items()),
        "flags": sorted((k, repr(v)) for k, v in flags.items()),
        "paths": list(paths),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def recorded_values(digest: str) -> dict[str, Any] | None:
    """The values recorded for ``digest``, or None when there is no (readable) record."""
    try:
        values = json.loads((record_dir() / f"{digest}.json").read_bytes())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def record_values(digest: str, values: dict[str, Any]) -> None:
    """Record a passed load's values under ``digest``; best effort (an unwritable cache records nothing)."""
    try:
        atomic_write_bytes(record_dir() / f"{digest}.json", json.dumps(values, sort_keys=True).encode())
    except OSError:
        pass
