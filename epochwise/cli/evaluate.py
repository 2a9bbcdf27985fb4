"""``epochwise evaluate``: score a fold's epochs on held-out folds (the ``evaluate-epochs`` flow).

epochwise evaluate folds/games --on 'folds/*'                                # every epoch, exact match
epochwise evaluate folds/games --on 'folds/*' --epochs 1,3 --metric json-field:winner_with_perfect_play
epochwise evaluate folds/games --on 'folds/*' --metric labels --metric mymetrics:score --budget 5
epochwise deploy folds/games --epoch best-eval                               # the epoch that generalised
"""

from __future__ import annotations

from pathlib import Path

import typer

from epochwise.cli.common import ConfigOption, PresetOption, before_flow_run, console, field_help, settings


def evaluate(
    fold: Path = typer.Argument(..., help="Fold whose epochs to evaluate (trained locally or on Together)."),
    on: list[str] = typer.Option(..., "--on", help="Eval folds: directories or globs such as 'folds/*' (repeatable)."),
    epochs: str = typer.Option(None, "--epochs", help=field_help("evaluate.epochs")),
    metrics: list[str] = typer.Option(
        None, "--metric", "-m", help=field_help("evaluate.metrics", "exact, contains, labels (accuracy/precision/"
                                                "recall/F1), json-field:NAME or module:function (repeatable; the "
                                                "first ranks --epoch best-eval).")
    ),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help=field_help("evaluate.max_new_tokens")),
    max_rows: int = typer.Option(None, "--max-rows", min=1, help=field_help("evaluate.max_rows")),
    budget_usd: float = typer.Option(None, "--budget", help=field_help("evaluate.budget_usd")),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Generate the reply to every eval fold's val.jsonl conversation with each epoch and score it."""
    cfg = settings(
        config,
        preset,
        **{
            "evaluate.epochs": epochs,
            "evaluate.metrics": metrics or None,
            "evaluate.max_new_tokens": max_new_tokens,
            "evaluate.max_rows": max_rows,
            "evaluate.budget_usd": budget_usd,
        },
    )
    before_flow_run()
    from epochwise.cli.deploy import _deploy_errors
    from flows.evaluate_epochs import evaluate_epochs

    with _deploy_errors():  # bad metrics, epochs or folds, refused deploys: one line each, no traceback
        summary = evaluate_epochs(str(fold), list(on), cfg.evaluate, cfg.deploy, cfg.together)  # see common.run_ended
    rows = summary["rows"]
    folds = sorted({r["eval fold"] for r in rows})
    from rich.table import Table

    table = Table(title=f"{fold.name}: evaluation ({summary['metric']} ranks)")
    for column in ["epoch", "metric", *folds, "mean"]:
        table.add_column(column, justify="right" if column not in ("metric",) else "left")
    for epoch in sorted({r["epoch"] for r in rows}):
        for name in dict.fromkeys(r["metric"] for r in rows):
            cells = {r["eval fold"]: r["value"] for r in rows if r["epoch"] == epoch and r["metric"] == name}
            mean = sum(cells.values()) / len(cells)
            mark = " *" if epoch == summary["best_eval_epoch"] and name == summary["metric"] else ""
            table.add_row(str(epoch), name, *(f"{cells[f]:.4f}" for f in folds), f"{mean:.4f}{mark}")
    console.print(table)
    generated = sum(r["generated"] for r in summary["results"])
    reused = sum(r["reused"] for r in summary["results"])
    console.print(f"best-eval epoch {summary['best_eval_epoch']}; replies generated {generated}, from cache {reused}")
    console.print(f"heatmap: {summary['heatmap']}  table: {summary['table']}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(evaluate)
