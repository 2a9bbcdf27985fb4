"""``epochwise sweep``: a hyper-parameter sweep of a fold, one epoch chain per trial (the ``sweep`` flow).

    epochwise sweep folds/games --space sweep.yaml --trials 6
    epochwise sweep folds/games --space sweep.yaml --trials 12 --parallel 3 --budget 40 --sampler tpe
    epochwise deploy folds/games --epoch best            # the best epoch of the fold, sweeps included
    epochwise deploy folds/games --trial 3 --epoch 2     # one trial's epoch
"""

from __future__ import annotations

from pathlib import Path

import typer

from epochwise.cli.common import (
    ConfigOption,
    PresetOption,
    before_flow_run,
    console,
    fail_lines,
    field_help,
    friendly_errors,
    print_table,
    report_problems,
    settings,
)
from epochwise.problems import UserError


def sweep(
    fold: Path = typer.Argument(..., help="Fold directory holding train.jsonl and val.jsonl."),
    space: Path = typer.Option(
        ..., "--space", help="Search space YAML: config fields -> a value, a list of values, or a range (uniform, log_uniform, int or log_int with a low and a high).",
        exists=True, dir_okay=False,
    ),
    name: str = typer.Option(None, "--name", help="Sweep name (default: the space file's name); its study is "
                             "<fold>/sweeps/<name>/journal.log, resumed when it exists."),
    trials: int = typer.Option(None, "--trials", "-n", help=field_help("sweep.trials")),
    parallel: int = typer.Option(None, "--parallel", "-k", help=field_help("sweep.parallel")),
    budget_usd: float = typer.Option(None, "--budget", help=field_help("sweep.budget_usd")),
    sampler: str = typer.Option(None, "--sampler", help=field_help("sweep.sampler")),
    pruner: str = typer.Option(None, "--pruner", help=field_help("sweep.pruner")),
    seed: int = typer.Option(None, "--seed", help=field_help("sweep.seed")),
    backend: str = typer.Option(None, "--backend", "-b", help=field_help("train.backend")),
    base_model: str = typer.Option(None, "--base-model", help=field_help("train.base_model")),
    model: str = typer.Option(None, "--model", help=field_help("train.local_model")),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Sweep hyper-parameters: one epoch chain per trial, bad chains pruned before their next epoch."""
    cfg = settings(
        config,
        preset,
        **{
            "sweep.trials": trials,
            "sweep.parallel": parallel,
            "sweep.budget_usd": budget_usd,
            "sweep.sampler": sampler,
            "sweep.pruner": pruner,
            "sweep.seed": seed,
            "train.backend": backend,
            "train.base_model": base_model,
            "train.local_model": model,
        },
    )
    from epochwise import sweep as sw

    try:  # what the user can fix is reported before Prefect starts
        parsed = sw.read_space(space)
        if cfg.sweep.sampler == "grid":
            parsed.grid()
    except UserError as exc:
        fail_lines(str(exc).splitlines())
    from epochwise.cli.train import _check_backend
    from epochwise.fold import Fold
    from epochwise.validate import validate_file

    _check_backend(cfg)
    where = Fold.of(fold)
    problems = [p for path in (where.train, where.val) for p in validate_file(path, max_line_bytes=cfg.data.max_line_bytes)]
    if problems:
        report_problems(problems)
    before_flow_run()
    from flows.sweep import sweep as sweep_flow

    with friendly_errors():
        state = sweep_flow(
            str(fold), str(space), name, cfg.sweep, cfg.train, cfg.together, cfg.local, cfg.harmony, cfg.ops,
            cfg.data, return_state=True,
        )
        failure = None
        if not state.is_completed():
            try:
                state.result()
            except Exception as exc:  # the flow's own failure (a trial's chain failed, a bad space)
                failure = f"sweep {where.name} {state.name.lower()}: {exc}"
    loaded = sw.load_trials(fold, name or space.stem)
    if loaded is not None:
        _print_result(fold, loaded[0], loaded[1], parsed, cfg.train.epochs)
    if failure:
        fail_lines([failure])


def _print_result(fold: Path, name: str, trials: list, space, epochs: int) -> None:
    from rich.table import Table

    from epochwise import sweep as sw
    from epochwise.fold import Fold

    fold_name = Fold.of(fold).name
    rows = sw.sweep_table(trials, fold_name, space, epochs)
    table = Table(title=f"{fold_name}: sweep {name}, {len(rows)} trial(s)")
    for column in rows[0] if rows else []:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    print_table(table)
    pruned = [t for t in trials if sw.trial_state(t) == "pruned"]
    trained = sum(len(sw.trial_epochs(t, fold_name)) for t in trials)
    console.print(f"{trained} epoch(s) trained; {len(pruned)} trial(s) pruned", markup=False)
    console.print(f"picture: {sw.sweep_dir(fold, name) / sw.PICTURE_FILE}", markup=False, soft_wrap=True)
    best = sw.best_trial_epoch(sw.candidates(trials, fold_name))
    if best is None:
        return
    r = best.record
    console.print(
        f"best: trial {best.trial} epoch {r.epoch}, val loss {r.val_loss:.4f}, model {r.model}",
        markup=False, soft_wrap=True,
    )
    console.print(
        f"next: epochwise deploy {fold} --epoch best\n      epochwise deploy {fold} --trial {best.trial} --epoch {r.epoch}",
        markup=False, soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(sweep)
