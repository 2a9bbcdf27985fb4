"""Training methods: how one epoch of a fold is trained, chosen once per run from ``(backend, method)``.

`flows.epoch_train` holds one `TrainingMethod` and runs the same loop for every backend: build it
(Together: credentials first, so a missing key fails before any other work), validate the fold,
``prepare`` (Together: Harmony conversion for gpt-oss, cached uploads; local: nothing), then
``run_epoch`` per epoch, continuing from the previous epoch's job or adapter. A new method (``dpo``,
``grpo``, ...) is a new class and a new `METHODS` entry, not a new branch in the flow.

``run_epoch`` returns None to stop the chain before anything was submitted (the budget) and raises on a
failed epoch; the caller publishes the table, progress and the early-stopping rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from prefect.transactions import transaction

from epochwise.config.data import DataConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord, publish_epochs
from epochwise.fold import Fold
from epochwise.problems import UserError
from epochwise.together_api import BudgetExceeded, JobFailed, RemoteFile
from tasks.cancellation import cancel_jobs_on_interrupt
from tasks.harmony import convert_fold_to_harmony
from tasks.together import (
    EpochSpec,
    api_base,
    api_tagged,
    ensure_uploaded,
    fetch_epoch_metrics,
    launch_epoch_job,
    wait_for_job,
)


@dataclass
class TrainContext:
    """What every method reads: the fold, the run's settings and the epochs finished so far."""

    fold: Fold
    path: str  # the flow's ``fold`` parameter as given: what the tasks take (their keys hash the content)
    train: TrainConfig
    together: TogetherConfig
    local: LocalConfig
    harmony: HarmonyConfig
    ops: OpsConfig
    data: DataConfig
    records: list[EpochRecord] = field(default_factory=list)
    uploads: list[RemoteFile] | None = None  # the Together files every epoch trains on (the report's lineage)


class TrainingMethod(Protocol):
    """One way of training an epoch; constructed once per run with the run's context."""

    def prepare(self, ctx: TrainContext) -> None:
        """Work done once before the first epoch, after the fold was validated."""

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord | None:
        """Train ``epoch`` from ``parent`` (the previous epoch's job id or adapter; None: the base model)."""


class TogetherSFT:
    """Supervised fine-tuning on Together: one job per epoch, ``from_checkpoint`` = the previous epoch's job."""

    def __init__(self, ctx: TrainContext) -> None:
        self.api_base = api_base(ctx.together)  # credentials first: a missing key fails before validation
        self.train_file: RemoteFile | None = None
        self.val_file: RemoteFile | None = None

    def prepare(self, ctx: TrainContext) -> None:
        files = ctx.fold.jsonl
        if "gpt-oss" in ctx.train.base_model:  # gpt-oss trains on Harmony token parquet, not ChatML
            parquet = convert_fold_to_harmony(ctx.path, ctx.harmony, ctx.data.max_line_bytes)
            files = [parquet["train"], parquet["val"]]
        self.train_file, self.val_file = (ensure_uploaded(path, ctx.together, ctx.ops) for path in files)
        ctx.uploads = [self.train_file, self.val_file]

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord | None:
        """Launch -> wait -> losses; None when the budget stops the chain before submitting.

        The transaction makes the launch's cache record commit only together with a completed job.
        Cancelling the run cancels the job (`tasks.cancellation`).
        """
        assert self.train_file is not None and self.val_file is not None, "prepare() first"
        hashes = (self.train_file.sha256, self.val_file.sha256)
        spec = EpochSpec(ctx.fold.name, epoch, ctx.train.base_model, parent, hashes, ctx.train.hyper, self.api_base)
        spent = sum(r.price_usd or 0.0 for r in ctx.records)
        try:  # Ctrl-C, or the SIGTERM of a cancel, cancels the job at Together (a crash leaves it to re-attach)
            with cancel_jobs_on_interrupt(ctx.together), transaction():
                launch = api_tagged(launch_epoch_job, ctx.ops)
                job = launch(spec, self.train_file.id, self.val_file.id, ctx.train, ctx.together, spent)
                info = wait_for_job(job, ctx.together)
                return api_tagged(fetch_epoch_metrics, ctx.ops)(job, info, ctx.together)
        except BudgetExceeded as stop:
            print(f"stopping before epoch {epoch}: {stop}")
            return None
        except JobFailed as failed:  # shown by `epochwise status`; the next run resubmits this epoch
            row = EpochRecord(
                fold=spec.fold,
                epoch=epoch,
                backend="together",
                status=failed.status,
                job_id=failed.job_id,
                parent=parent,
            )
            publish_epochs(ctx.fold.name, [*ctx.records, row])
            raise


class LocalSFT:
    """Supervised LoRA fine-tuning with PyTorch + PEFT, each epoch continuing from the previous adapter."""

    def __init__(self, ctx: TrainContext) -> None:
        pass

    def prepare(self, ctx: TrainContext) -> None:
        pass

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord:
        from tasks.local_train import train_local_epoch

        return train_local_epoch(ctx.path, epoch, ctx.train, ctx.local, parent)


class TogetherGRPO:
    """GRPO on Together's post-training API: one model resource (with a generator replica) for the run,
    one training session per epoch resumed from the previous epoch's training checkpoint; per step G
    completions per prompt are sampled, scored locally by ``train.rewards`` and trained on with the GRPO
    loss (`tasks.post_training`). Each epoch ends with a training checkpoint (``job_id``: what the next
    epoch resumes from) and an inference checkpoint registered in the model registry (``model``: what
    ``epochwise deploy FOLD --epoch N`` deploys). `close` stops the resource; the flow calls it in a
    ``finally``.
    """

    def __init__(self, ctx: TrainContext) -> None:
        from tasks.post_training import ResourceLease, register_lease

        self.api_base = api_base(ctx.together)  # credentials first: a missing key fails before validation
        self.lease = ResourceLease(ctx.fold.name, ctx.train, ctx.together)
        self.lease_name = register_lease(self.lease)

    def prepare(self, ctx: TrainContext) -> None:
        """Every reward imported and called on the first train row before anything is provisioned."""
        from epochwise.rewards import check_rewards, load_rewards
        from tasks.post_training import read_rows

        train_path = ctx.fold.jsonl[0]
        check_rewards(load_rewards(ctx.train.rewards), read_rows(train_path), train_path)
        if ctx.train.grpo.beta > 0:
            raise UserError(
                "GRPO on Together trains with train.grpo.beta = 0 only: a KL term needs reference logprobs "
                "of the base model for every sampled token, which epochwise does not compute yet"
            )

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord | None:
        from epochwise.io import sha256_file
        from tasks.post_training import train_grpo_epoch

        if parent is not None and ctx.records and ctx.records[-1].method != "grpo":
            raise UserError(
                f"GRPO on Together continues only from a GRPO epoch; epoch {epoch - 1} is {ctx.records[-1].method}"
            )
        train_path, val_path = ctx.fold.jsonl
        hashes = (sha256_file(train_path), sha256_file(val_path))
        spec = EpochSpec(ctx.fold.name, epoch, ctx.train.base_model, parent, hashes, ctx.train.hyper, self.api_base,
                         method=ctx.train.method_fields())
        spent = sum(r.price_usd or 0.0 for r in ctx.records)
        try:
            # Not api_tagged: the epoch holds its task for its whole length, like wait_for_job.
            return train_grpo_epoch(spec, self.lease_name, train_path, val_path, ctx.train, ctx.together, spent)
        except BudgetExceeded as stop:
            print(f"stopping before epoch {epoch}: {stop}")
            return None

    def close(self) -> None:
        from tasks.post_training import release_lease

        self.lease.close()
        release_lease(self.lease_name)


METHODS: dict[tuple[str, str], type[TogetherSFT] | type[LocalSFT] | type[TogetherGRPO]] = {
    ("together", "sft"): TogetherSFT,
    ("local", "sft"): LocalSFT,
    ("together", "grpo"): TogetherGRPO,
}


def training_method(ctx: TrainContext, backend: str, method: str | None = None) -> TrainingMethod:
    """The method for ``(backend, method)`` (default: ``train.method``), constructed for this run."""
    method = method or ctx.train.method
    try:
        chosen = METHODS[(backend, method)]
    except KeyError:
        known = ", ".join(f"{b}/{m}" for b, m in METHODS)
        raise UserError(f"no {method!r} training on the {backend!r} backend (available: {known})") from None
    return chosen(ctx)
