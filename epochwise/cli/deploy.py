"""``epochwise deploy`` and ``epochwise endpoints``: serve an epoch, show, stop and reap endpoints.

    epochwise deploy folds/games --epoch best        # or --epoch 3, or --job-id ft-...; best includes sweeps
    epochwise deploy folds/games --trial 3 --epoch 2 # an epoch of a trial of the fold's latest sweep
    epochwise endpoints folds/games                  # state of this fold's endpoints
    epochwise endpoints folds/games --stop           # scale them to zero replicas
    epochwise endpoints folds/games --stop --deployment me/ew-games-e2/d-ml-...   # only that one
    epochwise endpoints --reap --older-than 6h       # stop every epochwise endpoint older than 6 hours
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from epochwise.cli.common import (
    ConfigOption,
    PresetOption,
    before_flow_run,
    console,
    fail_lines,
    field_help,
    print_json,
    print_table,
    quiet_user_errors,
    settings,
)

if TYPE_CHECKING:
    from epochwise.config import Settings

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``6h``, ``90m``, ``2d``, ``45s`` (or a bare number of hours) in hours."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise typer.BadParameter(f"{text!r} is not an age like 6h, 90m or 2d")
    return float(match.group(1)) * _UNITS_S[match.group(2) or "h"] / 3600


@contextmanager
def _deploy_errors() -> Iterator[None]:
    """Expected failures (missing key, refused deploy, failed smoke test) as one line and exit code 1."""
    from together import APIError

    from epochwise.credentials import MissingCredentials
    from epochwise.endpoints_api import EndpointFailure
    from epochwise.epochs import EpochChoiceError
    from epochwise.problems import UserError

    try:
        with quiet_user_errors():
            yield
    except (EndpointFailure, EpochChoiceError, MissingCredentials, UserError) as exc:
        fail_lines([f"error: {exc}"])
    except APIError as exc:
        fail_lines([f"error: Together answered {getattr(exc, 'status_code', '')}: {exc}"])


def deploy(
    fold: Path = typer.Argument(..., help="Fold directory (or name) whose epoch to deploy."),
    epoch: str = typer.Option("best", "--epoch", help="'best' (lowest validation loss), 'best-eval' (best `epochwise evaluate` mean) or an epoch number."),
    job_id: str = typer.Option(None, "--job-id", help="Deploy this Together job's model instead of a recorded epoch."),
    trial: int = typer.Option(None, "--trial", help="A trial of the fold's sweep (with --epoch N or best)."),
    sweep: str = typer.Option(None, "--sweep", help="Which sweep of the fold --trial is in (default: the latest)."),
    hardware: str = typer.Option(None, "--hardware", help=field_help("deploy.hardware")),
    min_replicas: int = typer.Option(None, "--min-replicas", help=field_help("deploy.min_replicas")),
    max_replicas: int = typer.Option(None, "--max-replicas", help=field_help("deploy.max_replicas")),
    inactive_timeout: int = typer.Option(None, "--inactive-timeout", help=field_help("deploy.inactive_timeout_min")),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Deploy an epoch to a Together dedicated endpoint, wait until READY, smoke-test it."""
    cfg = settings(config, preset, **{"deploy.hardware": hardware, "deploy.min_replicas": min_replicas,
                                      "deploy.max_replicas": max_replicas, "deploy.inactive_timeout_min": inactive_timeout})
    before_flow_run()
    from flows.deploy_epoch import deploy_epoch

    with _deploy_errors():
        row = deploy_epoch(str(fold), epoch, job_id, cfg.deploy, cfg.together, trial, sweep)  # see common.run_ended
    if row["state"] == "EXPORTED":  # local backend: a merged model on disk, smoke-tested locally
        console.print(f"[green]exported[/green] epoch {row['epoch']} to {row['endpoint']}", soft_wrap=True)
        console.print(f"smoke reply: {row['smoke reply']!r}", markup=False, soft_wrap=True)
        console.print(
            f"load it with: AutoModelForCausalLM.from_pretrained({row['endpoint']!r})", markup=False, soft_wrap=True
        )
        return
    console.print(f"[green]ready[/green] {row['endpoint']} ({row['hardware']}, {row['replicas']} replicas)")
    console.print(f"smoke reply: {row['smoke reply']!r}", markup=False, soft_wrap=True)
    console.print("call it with:", markup=False)
    console.print(f"  client.chat.completions.create(model={row['endpoint']!r}, "
                  "messages=[{'role': 'user', 'content': '...'}])", markup=False, soft_wrap=True)


def endpoints(
    fold: Path = typer.Argument(None, help="Fold directory (or name); omit with --reap."),
    stop: bool = typer.Option(False, "--stop", help="Scale this fold's endpoints to zero replicas."),
    deployment: str = typer.Option(None, "--deployment", help="With --stop: only this deployment (name or id)."),
    reap: bool = typer.Option(False, "--reap", help="Stop every epochwise endpoint older than --older-than, and any deployment a failed rollback left live."),
    older_than: str = typer.Option(None, "--older-than", help=field_help("deploy.reap_older_than_h", "Age for --reap, e.g. 6h, 90m, 2d (a bare number is hours).")),
    as_json: bool = typer.Option(False, "--json", help="Print the fold's endpoints as JSON (after --stop, if given)."),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Show a fold's endpoints, stop them (--stop), or stop every old epochwise endpoint (--reap)."""
    cfg = settings(config, preset)
    if reap:
        if fold is not None or stop or as_json:
            fail_lines(["error: --reap covers every fold; use it without FOLD, --stop and --json"])
        _reap(cfg, parse_age(older_than) if older_than else None)
        return
    if fold is None:
        fail_lines(["error: give a FOLD, or --reap"])
    if older_than:
        fail_lines(["error: --older-than only applies to --reap"])
    if deployment and not stop:
        fail_lines(["error: --deployment only applies to --stop"])
    from epochwise.fold import Fold

    _fold_endpoints(cfg, Fold.of(fold).name, stop, deployment, as_json)


def _fold_endpoints(cfg: Settings, name: str, stop: bool, only: str | None = None, as_json: bool = False) -> None:
    from blocks.credentials import together_client
    from epochwise import endpoints_api as ea

    with _deploy_errors():
        client = ea.with_project(together_client(cfg.together))
        found = ea.epochwise_endpoints(client, name)
        if stop:
            if only and not any(only in (d.id, d.name) for ep in found for d in ep.deployments):
                fail_lines([f"error: {name}'s endpoints have no deployment {only}"])
            for endpoint in found:
                for dep in endpoint.deployments:
                    if dep.max_replicas > 0 and only in (None, dep.id, dep.name):
                        console.print(f"stopped {ea.scale_to_zero(client, endpoint.id, dep.id).name}", markup=False)
            found = ea.epochwise_endpoints(client, name)
    if as_json:
        print_json({"fold": name, "endpoints": ea.endpoint_rows(found) if found else []})
        return
    if not found:
        console.print(f"{name} has no endpoints", markup=False)
        return
    rows = ea.endpoint_rows(found)
    from rich.table import Table

    table = Table(title=f"{name} endpoints")
    columns = ["endpoint", "state", "routed", "hardware", "replicas", "created"]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    print_table(table)


def _reap(cfg: Settings, hours: float | None) -> None:
    before_flow_run()
    from flows.endpoint_reaper import endpoint_reaper

    with _deploy_errors():
        stopped = endpoint_reaper(hours, cfg.deploy, cfg.together)  # the value itself: see common.run_ended
    for name in stopped:
        console.print(f"stopped {name}", markup=False)
    limit = cfg.deploy.reap_older_than_h if hours is None else hours
    console.print(f"{len(stopped)} deployment(s) stopped (epochwise endpoints older than {limit:g} h)", markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(deploy)
    app.command()(endpoints)
