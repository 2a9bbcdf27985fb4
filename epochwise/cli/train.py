"""``epochwise train | status | abort | deploy-info``: the ``epoch-train`` flow and what it recorded.

epochwise train folds/games --backend together --epochs 5 --base-model openai/gpt-oss-20b
epochwise status folds/games            # from Prefect's <fold>-epochs artifact, no Together call
epochwise status folds/games --sync     # plus Together's own job list for this fold
epochwise abort folds/games             # cancel this fold's running Together jobs
epochwise deploy-info folds/games       # the model to deploy (best epoch by validation loss)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from epochwise.cli.common import (
    ConfigOption,
    console,
    fail_lines,
    friendly_errors,
    prefect_defaults,
    report_problems,
    settings,
)
from epochwise.config import Settings
from epochwise.fold import TRAIN_FILE, VAL_FILE
from epochwise.problems import UserError

FoldArgument = typer.Argument(..., help="Fold directory holding train.jsonl and val.jsonl.")


def train(
    fold: Path = FoldArgument,
    backend: str = typer.Option(None, "--backend", "-b", help="auto | together | local (default: auto)."),
    epochs: int = typer.Option(
        None, "--epochs", "-n", help="Total epochs; finished ones are never redone (default: 3)."
    ),
    base_model: str = typer.Option(None, "--base-model", help="Together base model (default: openai/gpt-oss-20b)."),
    model: str = typer.Option(None, "--model", help="Local model: tiny | smollm2 | HF id | path (default: tiny)."),
    learning_rate: float = typer.Option(None, "--lr", "--learning-rate", help="Peak learning rate (default: 1e-4)."),
    lr_scheduler: str = typer.Option(
        None, "--lr-scheduler", help="linear | cosine, restarted every epoch (default: linear)."
    ),
    min_lr_ratio: float = typer.Option(
        None, "--min-lr-ratio", help="Final LR / peak, per epoch (default: 1.0 = constant)."
    ),
    warmup_ratio: float = typer.Option(None, "--warmup-ratio", help="Warm-up share of each epoch (default: 0)."),
    batch_size: str = typer.Option(None, "--batch-size", help="Integer or 'max' (default: max)."),
    lora: bool = typer.Option(None, "--lora/--full", help="LoRA or full fine-tuning (default: lora)."),
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank (default: 16)."),
    lora_alpha: int = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: 2 x rank)."),
    lora_dropout: float = typer.Option(None, "--lora-dropout", help="LoRA dropout (default: 0)."),
    lora_trainable_modules: str = typer.Option(None, "--lora-trainable-modules", help="(default: all-linear)."),
    n_evals: int = typer.Option(
        None, "--n-evals", help="Evaluations per epoch (at least 1 with val.jsonl) (default: 1)."
    ),
    n_checkpoints: int = typer.Option(None, "--n-checkpoints", help="Checkpoints per epoch (default: 1)."),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help="Gradient clipping, 0 disables (default: 1.0)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="(default: 0)."),
    train_on_inputs: str = typer.Option(None, "--train-on-inputs", help="true | false | auto (default: false)."),
    max_seq_length: int = typer.Option(None, "--max-seq-length", help="Longest sequence in tokens."),
    seed: int = typer.Option(None, "--seed", help="Training seed (default: 42)."),
    budget_usd: float = typer.Option(None, "--budget", help="Stop before an epoch that would exceed this many USD."),
    stop_when_val_worsens: int = typer.Option(None, "--stop-when-val-worsens", help="Patience in epochs."),
    wandb_project: str = typer.Option(None, "--wandb-project", help="W&B project for Together's per-epoch runs."),
    config: Path = ConfigOption,
) -> None:
    """Train a fold one epoch at a time (one Together job per epoch, or the local trainer)."""
    cfg = settings(
        config,
        **{
            "train.backend": backend,
            "train.epochs": epochs,
            "train.base_model": base_model,
            "train.local_model": model,
            "train.budget_usd": budget_usd,
            "train.stop_when_val_worsens": stop_when_val_worsens,
            "train.wandb_project": wandb_project,
            "train.hyper.learning_rate": learning_rate,
            "train.hyper.lr_scheduler": lr_scheduler,
            "train.hyper.min_lr_ratio": min_lr_ratio,
            "train.hyper.warmup_ratio": warmup_ratio,
            "train.hyper.batch_size": _batch_size(batch_size),
            "train.hyper.lora": lora,
            "train.hyper.lora_r": lora_r,
            "train.hyper.lora_alpha": lora_alpha,
            "train.hyper.lora_dropout": lora_dropout,
            "train.hyper.lora_trainable_modules": lora_trainable_modules,
            "train.hyper.n_evals": n_evals,
            "train.hyper.n_checkpoints": n_checkpoints,
            "train.hyper.max_grad_norm": max_grad_norm,
            "train.hyper.weight_decay": weight_decay,
            "train.hyper.train_on_inputs": _train_on_inputs(train_on_inputs),
            "train.hyper.max_seq_length": max_seq_length,
            "train.hyper.seed": seed,
        },
    )
    # What the user can fix is reported before any work and before Prefect starts (its ephemeral API
    # takes seconds to boot): a missing key or an unknown --model first, then the fold's data.
    _check_backend(cfg)
    from epochwise.validate import validate_file

    problems = [p for name in (TRAIN_FILE, VAL_FILE) for p in validate_file(fold / name)]
    if problems:
        report_problems(problems)
    prefect_defaults()
    from flows.epoch_train import epoch_train

    with friendly_errors():
        state = epoch_train(str(fold), cfg.train, cfg.together, cfg.local, cfg.harmony, return_state=True)
        if not state.is_completed():
            try:
                state.result()
            except Exception as exc:  # the flow's own failure, e.g. Together's job error message
                fail_lines([f"epoch-train {fold.name} {state.name.lower()}: {exc}"])
        records = state.result()
    from epochwise.epochs import epoch_table

    _print_table(f"{fold.name}: {len(records)} epoch(s)", epoch_table(records))


def _check_backend(cfg: Settings) -> None:
    """Together: the key resolves (block or environment). Local: ``--model`` names a loadable model."""
    from blocks.credentials import resolve_together, together_configured

    block = cfg.together.credentials_block
    if cfg.train.backend == "together" or (cfg.train.backend == "auto" and together_configured(block)):
        if block:
            prefect_defaults()  # loading a block needs Prefect's API
        try:
            resolve_together(block)
        except ValueError as exc:  # no block of that name
            fail_lines([f"error: together.credentials_block {block!r}: {exc}"])
        except UserError as exc:
            fail_lines([f"error: {exc}"])
        return
    from epochwise.local.keys import check_model

    with friendly_errors():
        check_model(cfg.train.local_model)


def _batch_size(value: str | None) -> int | str | None:
    if value is None or value == "max":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter("an integer or 'max'", param_hint="--batch-size") from None


def _train_on_inputs(value: str | None) -> bool | str | None:
    choices: dict[str, bool | str] = {"true": True, "false": False, "auto": "auto"}
    if value is None:
        return None
    if value.lower() not in choices:
        raise typer.BadParameter("true, false or auto", param_hint="--train-on-inputs")
    return choices[value.lower()]


def _require_fold(fold: Path) -> None:
    """A fold that is not a directory is a typo or a missing `prepare`: say so, before Prefect starts."""
    if not fold.is_dir():
        what = "is not a directory" if fold.exists() else "does not exist"
        fail_lines([f"{fold}: fold folder {what} (make one with `epochwise prepare RECORDS --fold {fold}`)"])


def recorded_epochs(fold: Path) -> list[dict[str, Any]]:
    """The rows of the fold's latest ``<fold>-epochs`` artifact (what the last run recorded), or []."""
    prefect_defaults()
    from prefect.artifacts import Artifact

    from epochwise.artifacts import artifact_key

    artifact = Artifact.get(artifact_key(fold.name, "epochs"))
    if artifact is None or not artifact.data:
        return []
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return list(data)


def status(
    fold: Path = FoldArgument,
    sync: bool = typer.Option(False, "--sync", help="Also list this fold's jobs in Together's job list."),
    config: Path = ConfigOption,
) -> None:
    """Epochs recorded by Prefect for a fold; --sync reconciles them with Together's job list."""
    _require_fold(fold)
    rows = recorded_epochs(fold)
    if rows:
        _print_table(f"{fold.name}: epochs recorded by Prefect", rows)
    else:
        console.print(f"{fold.name}: no epochs recorded yet (run `epochwise train {fold}`)")
    if not sync:
        return
    from blocks.credentials import MissingCredentials, resolve_together
    from epochwise import together_api as api

    cfg = settings(config).together
    try:
        client = api.make_client(resolve_together(cfg.credentials_block), cfg)
    except MissingCredentials as exc:
        fail_lines([str(exc)])
    recorded = {row.get("job") for row in rows}
    jobs = api.fold_jobs(client, fold.name)
    table = [
        {
            "epoch": epoch,
            "job": job.id,
            "status": job.status,
            "model": job.model_output_name or "",
            "created": job.created_at or "",
            "recorded": "yes" if job.id in recorded else "no",
        }
        for epoch, job in jobs
    ]
    if table:
        _print_table(f"{fold.name}: jobs at Together", table)
    else:
        console.print(f"{fold.name}: no jobs at Together")
    live = [job.id for _, job in jobs if job.status not in api.TERMINAL]
    if live:
        console.print(f"running at Together: {', '.join(live)} (rerun `epochwise train {fold}` to re-attach)")


def abort(fold: Path = FoldArgument, config: Path = ConfigOption) -> None:
    """Cancel this fold's unfinished Together jobs (completed steps are still billed)."""
    from blocks.credentials import MissingCredentials, resolve_together
    from epochwise import together_api as api

    cfg = settings(config).together
    try:
        client = api.make_client(resolve_together(cfg.credentials_block), cfg)
    except MissingCredentials as exc:
        fail_lines([str(exc)])
    live = [(epoch, job) for epoch, job in api.fold_jobs(client, fold.name) if job.status not in api.TERMINAL]
    for epoch, job in live:
        console.print(f"epoch {epoch}: {job.id} {job.status} -> {api.cancel_job(client, job.id)}")
    if not live:
        console.print(f"{fold.name}: no unfinished jobs at Together")


def deploy_info(
    fold: Path = FoldArgument,
    epoch: str = typer.Option("best", "--epoch", "-e", help="Epoch number, or 'best' (lowest validation loss)."),
    as_json: bool = typer.Option(False, "--json", help="Print the chosen epoch's row as JSON."),
) -> None:
    """The Together model of one epoch (default: the best) to deploy, from Prefect's records."""
    _require_fold(fold)
    rows = [r for r in recorded_epochs(fold) if r.get("status") == "completed"]
    if not rows:
        fail_lines([f"{fold.name}: no completed epochs recorded (run `epochwise train {fold}` first)"])
    from epochwise.epochs import EpochChoiceError, choose_epoch, records_from_table

    try:
        number = choose_epoch(records_from_table(fold.name, rows), epoch).epoch
    except EpochChoiceError:
        fail_lines(
            [
                f"{fold.name}: epoch {epoch} is not among the completed epochs "
                f"{', '.join(str(r['epoch']) for r in rows)}"
            ]
        )
    chosen = next(r for r in rows if int(r["epoch"]) == number)
    if as_json:
        console.print_json(json.dumps({"fold": fold.name, **chosen}))
        return
    _print_table(f"{fold.name}: models per epoch", rows)
    console.print(
        f"deploy epoch {chosen['epoch']}: model {chosen['model']} (job {chosen['job']}, "
        f"val loss {chosen.get('val loss') or '?'})",
        markup=False,
    )


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for column in rows[0] if rows else []:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    # Model names are long and a narrow terminal wraps them inside the table; print them whole to copy.
    for row in rows:
        if row.get("model"):
            job = f" (job {row['job']})" if row.get("job") else ""
            console.print(f"epoch {row.get('epoch')}: {row['model']}{job}", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(train)
    app.command()(status)
    app.command()(abort)
    app.command(name="deploy-info")(deploy_info)
