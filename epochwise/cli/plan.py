"""``epochwise plan FOLD [train flags]``: the dry run of ``epochwise train`` with the same flags.

    epochwise plan folds/games --backend together --epochs 5 --budget 20
    epochwise plan folds/games --backend local --model smollm2

Validates the fold, counts its tokens (the model's own tokenizer where one is available offline, else an
estimate, and says which) and prints per epoch the training and validation tokens, the price and the
running total against ``--budget``; for parquet, billed vs real tokens (padding waste). Nothing is
uploaded and nothing is created: with Together it only lists files, reads the model's limits (a setting
they refuse is an error, as in ``train``, exit code 1) and, when the fold's files are already uploaded,
asks Together's ``estimate-price``. ``epochwise train`` prints
the same plan before the flow's first paid call.

``plan`` takes exactly the options of ``train`` (same declarations, same settings): the command is
declared beside ``train`` in `epochwise.cli.train` and runs it under `dry_run`; this module computes and
prints the plan.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from epochwise.cli.common import console, err_console, fail_lines, friendly_errors

if TYPE_CHECKING:
    from epochwise.config import Settings

_DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("epochwise_plan_dry_run", default=False)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """While active, `show_plan` tells the train command to stop after printing the plan."""
    token = _DRY_RUN.set(True)
    try:
        yield
    finally:
        _DRY_RUN.reset(token)


def show_plan(fold: Path, cfg: Settings) -> bool:
    """Print the plan of training ``fold`` with ``cfg``; True when this is ``epochwise plan`` (stop here).

    Under ``epochwise train`` the plan is shown before paid work only, so a local run (free, and whose
    tokenizing for the plan costs seconds on every rerun) goes straight to training; a plan that cannot
    be computed is reported in one line and training goes on (the flow checks files and prices again
    before paying). Under ``plan`` it is the error.
    """
    dry = _DRY_RUN.get()
    if not dry and _backend(cfg) != "together":
        return False
    try:
        with friendly_errors():
            found = compute_plan(fold, cfg)
            print_plan(found)
    except Exception as exc:
        if dry or _is_exit(exc):
            raise
        err_console.print(f"plan unavailable ({type(exc).__name__}: {exc}); training goes on", markup=False)
        return dry
    if found.refused:  # the flow would stop there too, before uploading anything
        fail_lines([f"error: Together would refuse every job on {found.model}: {'; '.join(found.refused)}"])
    return dry


def _backend(cfg: Settings) -> str:
    """``train.backend`` with ``auto`` resolved: Together when a key is configured, else local."""
    from epochwise.credentials import together_configured

    if cfg.train.backend != "auto":
        return cfg.train.backend
    return "together" if together_configured(cfg.together.credentials_block) else "local"


def _is_exit(exc: BaseException) -> bool:
    import click

    return isinstance(exc, click.exceptions.Exit)


def compute_plan(fold: Path, cfg: Settings):
    """The `epochwise.plan.Plan` for ``fold``: Together (read-only client when a key is configured) or local."""
    from epochwise.plan import build_plan

    backend = _backend(cfg)
    client = None
    if backend == "together":
        from blocks.credentials import MissingCredentials, together_client

        try:
            client = together_client(cfg.together)
        except MissingCredentials as exc:
            fail_lines([f"error: {exc}"])
    kept = _kept_epochs(fold, backend, cfg, client)
    return build_plan(fold, backend, cfg.train, cfg.local, cfg.harmony, client, kept, cfg.together.post_training)


def _kept_epochs(fold: Path, backend: str, cfg: Settings, client) -> list:
    """The recorded epochs of another method that a DPO or GRPO run continues (the flow's rule,
    `tasks.methods.earlier_epochs`): from the fold's ``<fold>-epochs`` table, else (Together) from
    Together's job list; [] for SFT runs."""
    if cfg.train.method == "sft":
        return []
    from epochwise.epochs import chain_before, read_epochs, records_from_table
    from epochwise.fold import Fold

    name = Fold.of(fold).name
    recorded = records_from_table(name, read_epochs(name))
    if not recorded and backend == "together" and client is not None:
        from epochwise.together_api import chain_records

        recorded = chain_records(client, name)
    return chain_before([r for r in recorded if r.backend == backend], cfg.train.method)


def print_plan(found) -> None:
    for line in found.summary_lines():
        console.print(line, markup=False, soft_wrap=True)
    for title, rows in ((f"{found.fold}: files", found.file_rows()), (f"{found.fold}: epochs", found.epoch_rows())):
        table = Table(title=title)
        for column in rows[0] if rows else []:
            table.add_column(str(column))
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
