"""``epochwise train | status | abort | deploy-info``: the ``epoch-train`` flow and what it recorded.

epochwise train folds/games --backend together --epochs 5 --base-model openai/gpt-oss-20b
epochwise status folds/games            # from Prefect's <fold>-epochs artifact, no Together call
epochwise status folds/games --sync     # plus Together's own job list for this fold
epochwise abort folds/games             # cancel this fold's running Together jobs
epochwise deploy-info folds/games       # the model to deploy (best epoch by validation loss)
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from epochwise.cli.common import (
    EPHEMERAL_TIMEOUT,
    ConfigOption,
    PresetOption,
    before_flow_run,
    console,
    fail_lines,
    field_help,
    friendly_errors,
    prefect_defaults,
    print_json,
    print_table,
    report_problems,
    run_ended,
    settings,
)
from epochwise.fold import Fold
from epochwise.problems import UserError

if TYPE_CHECKING:
    from epochwise.config import Settings

FoldArgument = typer.Argument(..., help="Fold directory holding train.jsonl and val.jsonl.")


def train(
    fold: Path = FoldArgument,
    backend: str = typer.Option(
        None,
        "--backend",
        "-b",
        help=field_help("train.backend", "auto | together | local; 'auto' = Together when a key is configured."),
    ),
    epochs: int = typer.Option(None, "--epochs", "-n", help=field_help("train.epochs")),
    method: str = typer.Option(None, "--method", "-m", help=field_help("train.method")),
    reward: list[str] = typer.Option(None, "--reward", help=field_help("train.rewards")),
    base_model: str = typer.Option(None, "--base-model", help=field_help("train.base_model")),
    model: str = typer.Option(None, "--model", help=field_help("train.local_model")),
    learning_rate: float = typer.Option(None, "--lr", "--learning-rate", help=field_help("train.hyper.learning_rate")),
    lr_scheduler: str = typer.Option(
        None, "--lr-scheduler", help=field_help("train.hyper.lr_scheduler", "linear | cosine, restarted every epoch.")
    ),
    min_lr_ratio: float = typer.Option(None, "--min-lr-ratio", help=field_help("train.hyper.min_lr_ratio")),
    warmup_ratio: float = typer.Option(None, "--warmup-ratio", help=field_help("train.hyper.warmup_ratio")),
    batch_size: str = typer.Option(None, "--batch-size", help=field_help("train.hyper.batch_size")),
    lora: bool = typer.Option(None, "--lora/--full", help=field_help("train.hyper.lora")),
    lora_r: int = typer.Option(None, "--lora-r", help=field_help("train.hyper.lora_r")),
    lora_alpha: int = typer.Option(None, "--lora-alpha", help=field_help("train.hyper.lora_alpha")),
    lora_dropout: float = typer.Option(None, "--lora-dropout", help=field_help("train.hyper.lora_dropout")),
    lora_trainable_modules: str = typer.Option(
        None, "--lora-trainable-modules", help=field_help("train.hyper.lora_trainable_modules")
    ),
    n_evals: int = typer.Option(None, "--n-evals", help=field_help("train.hyper.n_evals")),
    n_checkpoints: int = typer.Option(None, "--n-checkpoints", help=field_help("train.hyper.n_checkpoints")),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help=field_help("train.hyper.max_grad_norm")),
    weight_decay: float = typer.Option(None, "--weight-decay", help=field_help("train.hyper.weight_decay")),
    train_on_inputs: str = typer.Option(
        None,
        "--train-on-inputs",
        help=field_help("train.hyper.train_on_inputs", "true | false | auto: also train on prompt tokens."),
    ),
    max_seq_length: int = typer.Option(None, "--max-seq-length", help=field_help("train.hyper.max_seq_length")),
    seed: int = typer.Option(None, "--seed", help=field_help("train.hyper.seed")),
    budget_usd: float = typer.Option(None, "--budget", help=field_help("train.budget_usd")),
    stop_when_val_worsens: int = typer.Option(
        None, "--stop-when-val-worsens", help=field_help("train.stop_when_val_worsens")
    ),
    wandb_project: str = typer.Option(None, "--wandb-project", help=field_help("train.wandb_project")),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Train a fold one epoch at a time (one Together job per epoch, or the local trainer)."""
    cfg = settings(
        config,
        preset,
        **{
            "train.backend": backend,
            "train.epochs": epochs,
            "train.method": method,
            "train.rewards": reward or None,
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
    from epochwise.validate import validate_method_file

    limit = cfg.data.max_line_bytes
    method = cfg.train.method
    problems = [
        p for path in Fold.of(fold).files(method) for p in validate_method_file(path, method, max_line_bytes=limit)
    ]
    if problems:
        report_problems(problems)
    from epochwise.cli.plan import show_plan

    if show_plan(fold, cfg):  # `epochwise plan`: the dry run ends here, before anything is paid
        return
    before_flow_run()
    from flows.epoch_train import epoch_train

    with friendly_errors():
        try:  # the value itself, not the state's copy of it: see common.run_ended
            records = epoch_train(
                str(fold), cfg.train, cfg.together, cfg.local, cfg.harmony, ops=cfg.ops, data=cfg.data
            )
        except Exception as exc:  # the flow's own failure, e.g. Together's job error message
            if str(exc).startswith(EPHEMERAL_TIMEOUT):  # no run at all: friendly_errors explains it
                raise
            fail_lines([f"epoch-train {Fold.of(fold).name} {run_ended(exc)}: {exc}"])
    from epochwise.epochs import epoch_table

    _print_table(f"{Fold.of(fold).name}: {len(records)} epoch(s)", epoch_table(records))
    _print_next_steps(fold, records)


def _print_next_steps(fold: Path, records: list[Any]) -> None:
    """What to do with the trained epochs, as commands to copy."""
    steps = [f"epochwise status {fold}"]
    if records and all(r.backend == "local" for r in records):
        steps += [
            f'epochwise sample {fold} --epoch best --prompt "..."',
            f"epochwise export {fold} --epoch best --out exports/{Fold.of(fold).name}",
        ]
    else:
        steps += [f"epochwise deploy-info {fold}", f"epochwise deploy {fold} --epoch best"]
    console.print("next: " + "\n      ".join(steps), markup=False, soft_wrap=True)


def _check_backend(cfg: Settings) -> None:
    """Together: the key resolves (block or environment). Local: ``--model`` names a loadable model."""
    from epochwise.credentials import together_configured, together_from_env

    block = cfg.together.credentials_block
    if cfg.train.backend == "together" or (cfg.train.backend == "auto" and together_configured(block)):
        try:
            if block:
                prefect_defaults()  # loading a block needs Prefect's API
                from blocks.credentials import resolve_together

                resolve_together(block)
            else:
                together_from_env()
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
    from epochwise.epochs import read_epochs

    return read_epochs(Fold.of(fold).name)


def status(
    fold: Path = FoldArgument,
    sync: bool = typer.Option(False, "--sync", help="Also list this fold's jobs in Together's job list."),
    as_json: bool = typer.Option(False, "--json", help="Print the recorded epochs (and --sync's jobs) as JSON."),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Epochs recorded by Prefect for a fold; --sync reconciles them with Together's job list."""
    _require_fold(fold)
    rows = recorded_epochs(fold)
    if as_json and not sync:
        print_json({"fold": Fold.of(fold).name, "epochs": rows})
        return
    if not as_json:
        if rows:
            _print_table(f"{Fold.of(fold).name}: epochs recorded by Prefect", rows)
        else:
            console.print(
                f"{Fold.of(fold).name}: no epochs recorded yet (run `epochwise train {fold}`)",
                markup=False,
                soft_wrap=True,
            )
    if not sync:
        return
    from blocks.credentials import together_client
    from epochwise import together_api as api
    from epochwise.credentials import MissingCredentials

    cfg = settings(config, preset).together
    try:
        client = together_client(cfg)
    except MissingCredentials as exc:
        fail_lines([str(exc)])
    recorded = {row.get("job") for row in rows}
    jobs = api.fold_jobs(client, Fold.of(fold).name)
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
    if as_json:
        print_json({"fold": Fold.of(fold).name, "epochs": rows, "together": table})
        return
    if table:
        _print_table(f"{Fold.of(fold).name}: jobs at Together", table)
    else:
        console.print(f"{Fold.of(fold).name}: no jobs at Together")
    live = [job.id for _, job in jobs if job.status not in api.TERMINAL]
    if live:
        console.print(f"running at Together: {', '.join(live)} (rerun `epochwise train {fold}` to re-attach)")


def abort(fold: Path = FoldArgument, config: Path = ConfigOption, preset: list[str] = PresetOption) -> None:
    """Cancel this fold's unfinished Together jobs (completed steps are still billed) and stop its GRPO
    model resources (billed while READY)."""
    from blocks.credentials import together_client
    from epochwise import together_api as api
    from epochwise.credentials import MissingCredentials

    cfg = settings(config, preset).together
    try:
        client = together_client(cfg)
    except MissingCredentials as exc:
        fail_lines([str(exc)])
    live = [(epoch, job) for epoch, job in api.fold_jobs(client, Fold.of(fold).name) if job.status not in api.TERMINAL]
    for epoch, job in live:
        console.print(f"epoch {epoch}: {job.id} {job.status} -> {api.cancel_job(client, job.id)}")
    if not live:
        console.print(f"{Fold.of(fold).name}: no unfinished jobs at Together")
    from epochwise import post_training as pt
    from epochwise.fold import fold_slug

    for resource in pt.fold_resources(client, fold_slug(Fold.of(fold).name)):
        console.print(f"model resource {resource.id} {resource.status} -> {pt.stop_resource(client, resource.id)}")


def deploy_info(
    fold: Path = FoldArgument,
    epoch: str = typer.Option("best", "--epoch", "-e", help="Epoch number, or 'best' (lowest validation loss)."),
    as_json: bool = typer.Option(False, "--json", help="Print the chosen epoch's row as JSON."),
) -> None:
    """The Together model of one epoch (default: the best) to deploy, from Prefect's records."""
    _require_fold(fold)
    rows = [r for r in recorded_epochs(fold) if r.get("status") == "completed"]
    if not rows:
        fail_lines([f"{Fold.of(fold).name}: no completed epochs recorded (run `epochwise train {fold}` first)"])
    from epochwise.epochs import EpochChoiceError, choose_epoch, records_from_table

    try:
        number = choose_epoch(records_from_table(Fold.of(fold).name, rows), epoch).epoch
    except EpochChoiceError:
        fail_lines(
            [
                f"{Fold.of(fold).name}: epoch {epoch} is not among the completed epochs "
                f"{', '.join(str(r['epoch']) for r in rows)}"
            ]
        )
    chosen = next(r for r in rows if int(r["epoch"]) == number)
    if as_json:
        print_json({"fold": Fold.of(fold).name, **chosen})
        return
    _print_table(f"{Fold.of(fold).name}: models per epoch", rows)
    loss = f"val loss {chosen.get('val loss') or '?'}"
    if chosen.get("job"):
        line = f"deploy epoch {chosen['epoch']}: model {chosen['model']} (job {chosen['job']}, {loss})"
    else:  # a local epoch: the model is its adapter directory; `deploy` exports and smoke-tests it
        line = f"deploy epoch {chosen['epoch']}: local adapter {chosen['model']} ({loss})"
    console.print(line, markup=False, soft_wrap=True)
    console.print(f"next: epochwise deploy {fold} --epoch {chosen['epoch']}", markup=False, soft_wrap=True)


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0] if rows else []:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    print_table(table)
    # Model names are long and a narrow terminal wraps them inside the table; print them whole to copy.
    for row in rows:
        if row.get("model"):
            job = f" (job {row['job']})" if row.get("job") else ""
            console.print(f"epoch {row.get('epoch')}: {row['model']}{job}", markup=False, soft_wrap=True)


def plan(**params: Any) -> None:
    """Dry run of `train`: tokens and price per epoch against the budget; nothing uploaded or created."""
    from epochwise.cli.plan import dry_run

    with dry_run():
        train(**params)


# `epochwise plan` takes the same parameters (options, defaults, help) as `train`: typer reads this signature.
plan.__signature__ = inspect.signature(train, eval_str=True)  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(train)
    app.command()(plan)
    app.command()(status)
    app.command()(abort)
    app.command(name="deploy-info")(deploy_info)
