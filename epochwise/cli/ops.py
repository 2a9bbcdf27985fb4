"""``epochwise deployments apply|ls``: register epochwise on a Prefect server and show what is there."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from epochwise.cli.common import (
    APP_SETTINGS,
    ConfigOption,
    PresetOption,
    console,
    err_console,
    fail_lines,
    field_help,
    prefect_defaults,
    settings,
)

deployments_app = typer.Typer(
    help="Prefect deployments, schedules, limits and crash detection for a real server + worker.",
    no_args_is_help=True,
    **APP_SETTINGS,
)


@deployments_app.command("apply")
def apply(
    folds_root: Path = typer.Option(
        ..., "--folds-root", help="Directory whose sub-directories are folds (each with train.jsonl).",
        exists=True, file_okay=False,
    ),
    cron: str = typer.Option(None, "--cron", help=field_help("ops.cron")),
    timezone: str = typer.Option(None, "--timezone", help=field_help("ops.timezone")),
    schedule: str = typer.Option(
        None, "--schedule", help=field_help("ops.schedule")
    ),
    work_pool: str = typer.Option(None, "--work-pool", help=field_help("ops.work_pool")),
    result_storage: Path = typer.Option(
        None, "--result-storage",
        help=field_help("ops.result_storage"),
    ),
    prune: bool = typer.Option(False, "--prune", help="Delete the epoch-train and sweep deployments of folds gone from disk."),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Create or update the work pool, limits, crash automation and one epoch-train deployment per fold.

    Safe to re-run: everything is looked up by name and updated in place, never duplicated.
    """
    cfg = settings(
        config,
        preset,
        **{
            "ops.cron": cron,
            "ops.timezone": timezone,
            "ops.schedule": schedule,
            "ops.work_pool": work_pool,
            "ops.result_storage": str(result_storage.resolve()) if result_storage else None,
        },
    )
    prefect_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            err_console.print(
                "note: PREFECT_API_URL is not set; registering into the local database under PREFECT_HOME "
                "(the one `prefect server start` uses)."
            )
    from deployments.apply import apply_all

    try:
        report = apply_all(folds_root, cfg, prune=prune)
    except (FileNotFoundError, ValueError) as exc:
        fail_lines([f"error: {exc}"])
    from rich.table import Table

    table = Table(title=f"epochwise on Prefect ({cfg.ops.work_pool} pool)")
    for column in ("kind", "name", "action", "detail"):
        table.add_column(column)
    for row in report:
        table.add_row(row.kind, row.name, row.action, row.detail)
    console.print(table)
    folds = [r.name.split("/", 1)[1] for r in report if r.name.startswith("epoch-train/") and r.action not in ("stale", "deleted")]
    example = next((f for f in folds if f != "any-fold"), None)
    console.print(f"next: prefect worker start --pool {cfg.ops.work_pool}")
    if example:
        console.print(f"      prefect deployment run epoch-train/{example}")


@deployments_app.command("ls")
def ls() -> None:
    """List epochwise deployments with their schedules and concurrency limits."""
    prefect_defaults()
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["epochwise"]))
        )
        flows = {f.id: f.name for f in client.read_flows()}
    from rich.table import Table

    table = Table(title="epochwise deployments")
    for column in ("deployment", "schedule", "one at a time", "paused", "fold / parameters"):
        table.add_column(column, no_wrap=column == "deployment")
    for dep in sorted(found, key=lambda d: (flows.get(d.flow_id, ""), d.name)):
        schedules = ", ".join(
            f"{getattr(s.schedule, 'cron', s.schedule)} {getattr(s.schedule, 'timezone', None) or 'UTC'}"
            + ("" if s.active else " (inactive)")
            for s in dep.schedules
        )
        limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else None
        fold = dep.parameters.get("fold") or dep.parameters.get("folds_root")
        table.add_row(
            f"{flows.get(dep.flow_id, '?')}/{dep.name}",
            schedules or "-",
            "yes" if limit == 1 else "-",
            "yes" if dep.paused else "no",
            str(fold) if fold else ", ".join(sorted(dep.parameters)) or "-",
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(deployments_app, name="deployments")
