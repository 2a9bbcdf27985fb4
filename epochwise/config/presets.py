"""Presets (YAML overlays applied with ``--preset NAME``) and the other YAML files settings are read from.

A preset is looked up in the user's ``presets/`` directory beside the config file in use (or in the
working directory when there is none), then among the presets shipped in the package
(``epochwise/presets/*.yaml``); a user preset shadows a shipped one of the same name. A name ending in
``.yaml``/``.yml`` or holding a ``/`` is a path to a preset file. A records directory may carry its own
``epochwise.yaml`` whose ``data.mapping`` says how its records become conversations.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

PRESET_DIR = "presets"
RECORDS_CONFIG = "epochwise.yaml"
SUFFIXES = (".yaml", ".yml")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} when empty); an error naming the file when it is not a mapping."""
    import yaml

    with open(path, encoding="utf-8") as stream:  # a YAML error's mark then names the file
        loaded = yaml.safe_load(stream)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings sections, got {type(loaded).__name__}")
    return loaded


def shipped_presets() -> dict[str, Path]:
    """The presets shipped in the package, by name."""
    root = resources.files("epochwise.presets")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in root.iterdir()
        if entry.is_file() and entry.name.endswith(SUFFIXES)
    }


def user_preset_dir(config_file: Path | None) -> Path:
    """``presets/`` beside the config file in use, or in the working directory when there is none."""
    return (Path(config_file).parent if config_file is not None else Path.cwd()) / PRESET_DIR


def user_presets(config_file: Path | None) -> dict[str, Path]:
    folder = user_preset_dir(config_file)
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir()) if path.is_file() and path.suffix in SUFFIXES}


def available_presets(config_file: Path | None) -> dict[str, Path]:
    """Every preset name that resolves, the user's shadowing the shipped ones."""
    return {**shipped_presets(), **user_presets(config_file)}


def find_preset(name: str, config_file: Path | None) -> Path:
    """The file of preset ``name``; an error listing the available presets and the closest name."""
    if name.endswith(SUFFIXES) or "/" in name:
        if not Path(name).is_file():
            raise FileNotFoundError(f"preset file not found: {name}")
        return Path(name)
    available = available_presets(config_file)
    if name in available:
        return available[name]
    close = difflib.get_close_matches(name, list(available), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    names = ", ".join(sorted(available)) or "none"
    raise ValueError(
        f"unknown preset {name!r}{hint}; available: {names} "
        f"(your own go in {user_preset_dir(config_file) / 'NAME.yaml'})"
    )


def records_config(records: Path | str) -> Path | None:
    """A records directory's own ``epochwise.yaml`` (the file's directory for a single records file)."""
    records = Path(records)
    folder = records if records.is_dir() else records.parent
    path = folder / RECORDS_CONFIG
    return path if path.is_file() else None


def with_records_mapping(data: Any, records: Path | str) -> Any:
    """``data`` (a `DataConfig`) with the records' own ``data.mapping`` when its mapping is the default.

    What the ``prepare-fold`` flow applies to parameters that came without a mapping (a deployment
    applied from a config file that has none); the CLI already layers the records' file below the
    config file, so its non-default mapping is kept as it is.
    """
    from epochwise.config.data import RecordMapping

    path = records_config(records)
    if path is None or data.mapping != RecordMapping():
        return data
    mapping = (read_yaml(path).get("data") or {}).get("mapping") or {}
    return data.model_copy(update={"mapping": RecordMapping.model_validate(mapping)})
