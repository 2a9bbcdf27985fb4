"""Shared CLI plumbing: the rich console, config loading and friendly failures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from epochwise.config import Settings, load_settings
from epochwise.problems import InputError, Problem

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="YAML config file (default: $EPOCHWISE_CONFIG, else ./epochwise.yaml when present).",
    exists=True,
    dir_okay=False,
)


def prefect_defaults() -> None:
    """Environment defaults that make Prefect's ephemeral API usable on small, offline machines.

    The 20 s ephemeral start-up timeout is too short on 2 loaded cores (cold starts timed out at load
    average ~2.7), and offline every server start logs a "Failed to send telemetry" DNS error.
    Explicit user settings win.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def settings(config: Path | None, **flags: Any) -> Settings:
    """Load settings; ``flags`` maps dotted paths (``"data.seed"``) to CLI values, ``None`` meaning unset."""
    if config is None:
        env = os.environ.get("EPOCHWISE_CONFIG")
        config = Path(env) if env else (Path("epochwise.yaml") if Path("epochwise.yaml").is_file() else None)
    overrides: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = overrides
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return load_settings(config, overrides)
    except ValidationError as exc:
        fail_lines([f"{config or 'settings'}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()])
    except (FileNotFoundError, ValueError) as exc:
        fail_lines([str(exc)])


def fail_lines(lines: list[str], code: int = 1) -> NoReturn:
    for line in lines:
        err_console.print(line, markup=False, soft_wrap=True)  # one problem per line, never wrapped
    raise typer.Exit(code)


def report_problems(problems: list[Problem]) -> NoReturn:
    fail_lines([str(p) for p in problems] + [f"{len(problems)} problem(s) found"])


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn expected failures (bad input, missing files) into clear messages and exit code 1."""
    try:
        yield
    except InputError as exc:
        report_problems(exc.problems)
    except FileNotFoundError as exc:
        fail_lines([f"error: {exc}"])


def dotted(**kwargs: Any) -> dict[str, Any]:
    """``dotted(data__seed=1)`` -> ``{"data.seed": 1}``: CLI flag names to settings paths."""
    return {k.replace("__", "."): v for k, v in kwargs.items()}


Command = Callable[..., Any]
