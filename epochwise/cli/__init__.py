"""The ``epochwise`` command line (typer). Each command module registers its commands here.

`main` builds the app from the one module whose command runs, so ``epochwise validate`` never
compiles or wires up the training, sweep or deploy commands; ``--help``, no command and a
misspelt one get every command (the listing, and click's "did you mean"). ``from epochwise.cli
import app`` is the whole app.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from epochwise.cli import common

# Each top-level command (or group) -> the module of `epochwise.cli` that registers it, in the order
# `--help` lists them; a unit test checks it against what the modules register.
COMMANDS = {
    "prepare": "data",
    "validate": "data",
    "convert": "convert",
    "train": "train",
    "plan": "train",
    "status": "train",
    "abort": "train",
    "deploy-info": "train",
    "sweep": "sweep",
    "export": "local",
    "sample": "local",
    "deploy": "deploy",
    "endpoints": "deploy",
    "evaluate": "evaluate",
    "deployments": "ops",
    "config": "config",
}
MODULES = tuple(dict.fromkeys(COMMANDS.values()))  # each once, in that order


def build_app(modules: tuple[str, ...] = MODULES) -> typer.Typer:
    """The ``epochwise`` app with the commands of ``modules``."""
    app = typer.Typer(
        name="epochwise",
        help="Fine-tune LLMs one epoch at a time on Together AI (or locally), orchestrated by Prefect.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        **common.APP_SETTINGS,
    )
    # A callback keeps the app a group even with one command in it (`epochwise convert FOLD`, not
    # `epochwise FOLD`); it has no options of its own.
    app.callback()(_no_options)
    for name in modules:
        importlib.import_module(f"epochwise.cli.{name}").register(app)
    common.APP = app  # for flag names in config errors
    return app


def _no_options() -> None:
    pass


def modules_for(argv: list[str]) -> tuple[str, ...]:
    """The modules a command line needs: its command's, or all of them (help, none, unknown)."""
    module = COMMANDS.get(argv[0]) if argv else None
    return (module,) if module else MODULES


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first use, then an ordinary module attribute
        globals()["app"] = app = build_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # Before any command imports Prefect: its settings are read once, when it is first imported.
    from epochwise.cli.common import prefect_defaults

    prefect_defaults()
    build_app(modules_for(sys.argv[1:]))()
