"""Prefect tasks of the ``sweep`` flow: open the study, price and admit trials, report epochs to the
pruner, hold the trials' concurrency limit, publish the result. Thin wrappers over `epochwise.sweep`.

Every task opens the study from its journal file (``<fold>/sweeps/<name>/journal.log``) again: reading
an append-only journal is cheap, and no Optuna object crosses a task boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency

from blocks.credentials import together_client
from epochwise import sweep as sw
from epochwise.artifacts import artifact_key
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.sweep import SweepConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord
from epochwise.fold import Fold
from epochwise.io import atomic_write_bytes
from epochwise.report import data_uri
from tasks.locks import read_or_create_limit


@dataclass(frozen=True)
class SweepRef:
    """One sweep of one fold: where its journal is, its space and settings."""

    fold: str
    name: str
    space: sw.Space
    cfg: SweepConfig

    @property
    def directory(self) -> Path:
        return sw.sweep_dir(self.fold, self.name)

    @property
    def label(self) -> str:
        return f"{Fold.of(self.fold).name}-{self.name}"

    @property
    def limit(self) -> str:
        """The global concurrency limit bounding this sweep's trials at once."""
        return artifact_key(f"epochwise-sweep-{Fold.of(self.fold).slug}", self.name)

    def open(self) -> sw.Study:
        return sw.Study(self.directory, self.name, self.cfg, self.space)

    def link(self, number: int) -> sw.TrialLink:
        return sw.TrialLink(
            directory=str(self.directory), study=self.name, number=number, label=f"{self.label}-t{number}", sweep=self.cfg
        )


@task(cache_policy=NO_CACHE)
def open_sweep(fold: str, space: sw.Space, name: str, cfg: SweepConfig) -> list[int]:
    """Create the study (or load it, checking it was started with the same space); the trials a killed
    run left unfinished, to train again first."""
    ref = SweepRef(fold, name, space, cfg)
    study = ref.open()
    left = study.unfinished()
    done = len(study.trials()) - len(left)
    get_run_logger().info(
        f"sweep {name}: {done} trial(s) finished, {len(left)} to resume {left or ''} in {ref.directory}"
    )
    return left


@task(cache_policy=NO_CACHE)
def estimate_chain_usd(
    fold: str, train: TrainConfig, local: LocalConfig, harmony: HarmonyConfig, together: TogetherConfig
) -> float | None:
    """The estimated price of one whole chain with these settings: Together's estimate-price per epoch
    for the uploaded fold files (`epochwise.plan`), times the epochs; None when it cannot be priced."""
    from epochwise.plan import build_plan

    plan = build_plan(fold, "together", train, local, harmony, together_client(together))
    prices = [e.price_usd for e in plan.epochs]
    return None if any(p is None for p in prices) else round(sum(prices), 6)  # type: ignore[arg-type]


@task(cache_policy=NO_CACHE)
def admit_trial(ref: SweepRef, estimate_usd: float | None) -> int | None:
    """Ask Optuna for the next trial when its estimated chain fits in what the budget has left
    (spent + what running trials may still spend); None (nothing asked) when it does not."""
    study = ref.open()
    if ref.cfg.budget_usd is not None and estimate_usd is not None:
        committed = sw.committed_usd(study.trials())
        if committed + estimate_usd > ref.cfg.budget_usd:
            get_run_logger().info(
                f"sweep {ref.name}: budget stop: the next trial would cost ~${estimate_usd:.2f}; "
                f"${committed:.2f} spent or held of ${ref.cfg.budget_usd:.2f}"
            )
            return None
    return study.ask(estimate_usd)


@task(cache_policy=NO_CACHE)
def trial_settings(
    ref: SweepRef, number: int, train: TrainConfig, local: LocalConfig, estimate_usd: float | None
) -> tuple[TrainConfig, LocalConfig]:
    """The trial's ``train`` and ``local``; ``train.budget_usd`` = what the sweep's budget leaves it, so
    epoch-train's own check stops the chain before an epoch that would exceed the sweep's budget."""
    study = ref.open()
    if estimate_usd is not None and "estimate_usd" not in study.trial(number).user_attrs:
        study.set(number, "estimate_usd", estimate_usd)  # a resumed trial from before it was priced
    trial_train, trial_local = sw.trial_settings(study.params(number), train, local)
    if ref.cfg.budget_usd is not None:
        left = ref.cfg.budget_usd - sw.committed_usd(study.trials(), excluding=number)
        trial_train = trial_train.model_copy(update={"budget_usd": max(left, 1e-9)})
    get_run_logger().info(f"trial {number}: {study.params(number)}")
    return trial_train, trial_local


@task(cache_policy=NO_CACHE)
def keep_training(trial: sw.TrialLink, record: EpochRecord, epochs: int) -> bool:
    """Report an epoch's validation loss to the sweep; False when the pruner stops the chain here, before
    the next epoch is submitted."""
    keep = trial.open().report_epoch(trial.number, record, epochs)
    if not keep:
        get_run_logger().info(f"trial {trial.number} pruned after epoch {record.epoch} (val loss {record.val_loss})")
    return keep


@task(cache_policy=NO_CACHE)
def finish_trial(ref: SweepRef, number: int, records: list[EpochRecord], epochs: int, stalled: bool) -> str:
    """Tell the study how the chain ended; returns the trial's state."""
    study = ref.open()
    study.finish(number, records, epochs, stalled)
    return sw.trial_state(study.trial(number))


@task(cache_policy=NO_CACHE)
def fail_trial(ref: SweepRef, number: int, error: str) -> None:
    """Keep a trial whose chain failed RUNNING, with the reason: the next run of the sweep trains it again
    (epoch-train resubmits only the failed epoch)."""
    ref.open().set(number, "error", error[:500])


@task(cache_policy=NO_CACHE)
def trial_slots(ref: SweepRef, parallel: int) -> str:
    """Create (or resize) the sweep's global concurrency limit to ``parallel`` slots; returns its name.

    The limit is this sweep's own and this run holds the sweep's lock, so a slot still taken was left
    by a killed run of this sweep: it is freed now rather than when its lease expires (the ephemeral
    API never expires leases: Prefect runs that service only in ``prefect server start``).
    """
    with get_client(sync_client=True) as client:
        current = read_or_create_limit(client, ref.limit, parallel)
        if current is None:
            return ref.limit
        update = GlobalConcurrencyLimitUpdate(limit=parallel)
        if current.active_slots:
            get_run_logger().info(f"{ref.limit}: freeing {current.active_slots} slot(s) left by a killed run")
            update = GlobalConcurrencyLimitUpdate(limit=parallel, active_slots=0)
        if current.limit != parallel or update.active_slots is not None:
            client.update_global_concurrency_limit(ref.limit, update)
    return ref.limit


@contextlib.contextmanager
def trial_slot(limit: str) -> Iterator[None]:
    """One slot of the sweep's limit for the whole chain (strict: a deleted limit fails, not unbounded)."""
    with concurrency(limit, occupy=1, strict=True):
        yield


@task(cache_policy=NO_CACHE)
def publish_sweep(ref: SweepRef, epochs: int, summary: str) -> dict[str, object]:
    """The ``<fold>-sweep`` table artifact (one row per trial: state, parameters, validation loss per
    epoch, price), the ``<fold>-sweep-plot`` markdown artifact with the picture inline (a data URI, which
    the Prefect UI draws), and ``sweep.png`` + ``sweep.md`` in the sweep directory. Returns the best
    (trial, epoch) as a dict (empty when none)."""
    study = ref.open()
    name = Fold.of(ref.fold).name
    trials = study.trials()
    rows = sw.sweep_table(trials, name, ref.space, epochs)
    best = sw.best_trial_epoch(sw.candidates(trials, name))
    title = f"{name}: sweep {ref.name}"
    png = sw.sweep_png(title, trials, name)
    atomic_write_bytes(ref.directory / sw.PICTURE_FILE, png)
    atomic_write_bytes(
        ref.directory / sw.TABLE_FILE, sw.sweep_markdown(title, rows, sw.PICTURE_FILE, best, summary).encode("utf-8")
    )
    create_table_artifact(rows, key=artifact_key(name, "sweep"), description=f"{title}: {summary}")
    create_markdown_artifact(
        sw.sweep_markdown(title, rows, data_uri(png), best, summary),
        key=artifact_key(name, "sweep-plot"),
        description=f"{title}: validation loss per epoch per trial",
    )
    if best is None:
        return {}
    return {"trial": best.trial, **best.record.model_dump(mode="json", exclude_none=True)}
