"""``epochwise config show``: the resolved settings, and where each value that is not a default came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from epochwise.cli.common import (
    APP_SETTINGS,
    ConfigOption,
    PresetOption,
    fail_lines,
    print_json,
    resolve_settings,
    source_text,
)

config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True, **APP_SETTINGS)


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set train.epochs=1`` pairs as ``{"train.epochs": 1}``; values are read as YAML scalars."""
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail_lines([f"--set {pair}: expected KEY=VALUE, e.g. --set train.epochs=1"])
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def flat(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {key path: leaf value}."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def scalar(value: Any) -> str:
    """A value as YAML writes it inline (``0.0001``, ``null``, ``'a: b'``)."""
    import json

    import yaml

    if isinstance(value, str) and "\n" in value:
        return json.dumps(value, ensure_ascii=False)  # a YAML double-quoted scalar, on one line
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def show(
    preset: list[str] = PresetOption,
    config: Path = ConfigOption,
    records: Path = typer.Option(
        None, "--records", help="Also apply the data.mapping of this records directory's own epochwise.yaml."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE on top of everything, as a command's flag would (e.g. train.epochs=1)."
    ),
    as_json: bool = typer.Option(False, "--json", help="JSON {settings, sources} for scripts."),
) -> None:
    """Print the resolved settings; each value that is not a default has a `# from <source>` note."""
    flags = parse_sets(set_ or [])
    names = {key: f"--set {key}" for key in flags}
    resolved = resolve_settings(config, preset, records, flag_names=names, **flags)
    from epochwise.config.settings import Settings

    values = resolved.settings.model_dump(mode="json")
    defaults = flat(Settings.model_validate({}).model_dump(mode="json"))
    sources: dict[str, str] = {}
    for path, value in flat(values).items():
        if path in defaults and defaults[path] == value:
            continue
        found = resolved.source(list(path))
        sources[".".join(path)] = source_text(*found, names) if found is not None else "a validator"
    if as_json:
        print_json({"settings": values, "sources": sources})
        return
    lines: list[str] = []
    write_yaml(values, (), sources, lines)
    print("\n".join(lines))


def write_yaml(values: dict[str, Any], prefix: tuple[str, ...], sources: dict[str, str], lines: list[str]) -> None:
    indent = "  " * len(prefix)
    for key, value in values.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            write_yaml(value, path, sources, lines)
            continue
        note = sources.get(".".join(path))
        lines.append(f"{indent}{key}: {scalar(value)}" + (f"  # from {note}" if note else ""))


config_app.command()(show)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(config_app, name="config")
