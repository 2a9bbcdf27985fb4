"""The ``epochwise`` command line (typer + rich). Each command module registers its commands here."""

from __future__ import annotations

import typer

from epochwise.cli import common, config, convert, data, deploy, evaluate, local, ops, sweep, train

app = typer.Typer(
    name="epochwise",
    help="Fine-tune LLMs one epoch at a time on Together AI (or locally), orchestrated by Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    **common.APP_SETTINGS,
)

app.command()(data.prepare)
app.command()(data.validate)
for module in (convert, train, sweep, local, deploy, ops, evaluate, config):
    module.register(app)
common.APP = app  # for flag names in config errors


def main() -> None:
    # Before any command imports Prefect: its settings are read once, when it is first imported.
    from epochwise.cli.common import prefect_defaults

    prefect_defaults()
    app()
