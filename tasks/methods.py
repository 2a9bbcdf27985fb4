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
from epochwise.epochs import EpochRecord, chain_before, publish_epochs, read_epochs, records_from_table
from epochwise.fold import Fold
from epochwise.problems import UserError
from epochwise.together_api import BudgetExceeded, JobFailed, RemoteFile
from tasks.cancellation import cancel_jobs_on_interrupt
from tasks.together import (
    EpochSpec,
    api_base,
    api_tagged,
    check_model_limits,
    ensure_uploaded,
    fetch_epoch_metrics,
    launch_epoch_job,
    listed_chain,
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

    method = "sft"

    def __init__(self, ctx: TrainContext) -> None:
        self.api_base = api_base(ctx.together)  # credentials first: a missing key fails before validation
        self.train_file: RemoteFile | None = None
        self.val_file: RemoteFile | None = None

    def fold_files(self, ctx: TrainContext) -> list[str]:
        """The files this method uploads: the fold's chat rows, as Harmony parquet for gpt-oss."""
        if "gpt-oss" in ctx.train.base_model:  # gpt-oss trains on Harmony token parquet, not ChatML
            # Imported here: pyarrow and openai-harmony cost every other fold's process ~0.5 s to load.
            from tasks.harmony import convert_fold_to_harmony

            parquet = convert_fold_to_harmony(ctx.path, ctx.harmony, ctx.data.max_line_bytes)
            return [parquet["train"], parquet["val"]]
        return ctx.fold.jsonl

    def prepare(self, ctx: TrainContext) -> None:
        check_model_limits(ctx.train.base_model, ctx.train.hyper, True, ctx.together)  # before any upload
        files = self.fold_files(ctx)
        self.train_file, self.val_file = (ensure_uploaded(path, ctx.together, ctx.ops) for path in files)
        ctx.uploads = [self.train_file, self.val_file]

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord | None:
        """Launch -> wait -> losses; None when the budget stops the chain before submitting.

        The transaction makes the launch's cache record commit only together with a completed job.
        Cancelling the run cancels the job (`tasks.cancellation`).
        """
        assert self.train_file is not None and self.val_file is not None, "prepare() first"
        hashes = (self.train_file.sha256, self.val_file.sha256)
        spec = EpochSpec(
            ctx.fold.name,
            epoch,
            ctx.train.base_model,
            parent,
            hashes,
            ctx.train.hyper,
            self.api_base,
            ctx.train.method_fields(),  # empty for SFT: SFT keys are what they always were
        )
        spent = sum(r.price_usd or 0.0 for r in ctx.records)
        try:  # Ctrl-C, or the SIGTERM of a cancel, cancels the job at Together (a crash leaves it to re-attach)
            with cancel_jobs_on_interrupt(ctx.together), transaction():
                launch = api_tagged(launch_epoch_job, ctx.ops)
                job = launch(spec, self.train_file.id, self.val_file.id, ctx.train, ctx.together, spent)
                info = wait_for_job(job, ctx.together)
                record = fetch_epoch_metrics(job, info, ctx.together)
                return record.model_copy(update={"method": self.method})
        except BudgetExceeded as stop:
            print(f"stopping before epoch {epoch}: {stop}")
            return None
        except JobFailed as failed:  # shown by `epochwise status`; the next run resubmits this epoch
            row = EpochRecord(
                fold=spec.fold,
                epoch=epoch,
                backend="together",
                method=self.method,
                status=failed.status,
                job_id=failed.job_id,
                parent=parent,
            )
            publish_epochs(ctx.fold.name, [*ctx.records, row])
            raise


class TogetherDPO(TogetherSFT):
    """Direct preference optimisation on Together: `TogetherSFT`'s epochs (cached uploads, one job per
    epoch found again by its suffix, re-attach, budget, losses from the job's metrics), each job created
    with ``training_method="dpo"`` and ``train.dpo``'s parameters, on the fold's preference rows
    (``train_dpo.jsonl`` / ``val_dpo.jsonl``, else ``train.jsonl`` / ``val.jsonl``: `Fold.files`).

    The epoch key adds the method and its parameters (`TrainConfig.method_fields`). Epoch 1 trains the
    base model; a chain switched from SFT continues from the last SFT epoch's job (`earlier_epochs`),
    which Together allows: a DPO job may start ``from_checkpoint`` an SFT job
    (https://docs.together.ai/docs/fine-tuning/preference-tuning).
    """

    method = "dpo"

    def fold_files(self, ctx: TrainContext) -> list[str]:
        return ctx.fold.jsonl_for("dpo")  # JSONL for every model: Harmony parquet holds SFT tokens only


class LocalSFT:
    """Supervised LoRA fine-tuning with PyTorch + PEFT, each epoch continuing from the previous adapter."""

    def __init__(self, ctx: TrainContext) -> None:
        pass

    def prepare(self, ctx: TrainContext) -> None:
        pass

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord:
        from tasks.local_train import train_local_epoch

        return train_local_epoch(ctx.path, epoch, ctx.train, ctx.local, parent)


class LocalDPO(LocalSFT):
    """DPO on the local trainer (`epochwise.local.dpo`): one adapter per epoch from the previous one (an SFT
    epoch's adapter may be the parent), on the fold's preference rows (`Fold.files`)."""

    def __init__(self, ctx: TrainContext) -> None:
        if not ctx.train.hyper.lora:
            raise UserError("the local backend trains LoRA adapters only (set train.hyper.lora=true)")

    def run_epoch(self, ctx: TrainContext, epoch: int, parent: str | None) -> EpochRecord:
        from tasks.local_rl import train_local_rl_epoch

        return train_local_rl_epoch(ctx.path, epoch, ctx.train, ctx.local, parent)


class LocalGRPO(LocalDPO):
    """GRPO on the local trainer (`epochwise.local.grpo`) with the user's reward functions.

    Checked before any model loads: the batch constraints (`prompts_per_step`), and every reward imported
    and called on the first prompt row of the fold (`epochwise.rewards.check_rewards`).
    """

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        from epochwise.local.grpo import prompts_per_step
        from epochwise.rewards import load_rewards

        prompts_per_step(ctx.train)
        self.rewards = load_rewards(ctx.train.rewards)

    def prepare(self, ctx: TrainContext) -> None:
        from epochwise.rewards import check_rewards, read_prompt_rows

        train_file, _ = ctx.fold.files("grpo")
        check_rewards(self.rewards, read_prompt_rows(train_file)[:1], str(train_file))


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
        from epochwise.rewards import check_rewards, load_rewards, read_prompt_rows

        train_path = ctx.fold.jsonl_for("grpo")[0]
        check_rewards(load_rewards(ctx.train.rewards), read_prompt_rows(train_path), train_path)
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
        train_path, val_path = ctx.fold.jsonl_for("grpo")
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
    ("together", "dpo"): TogetherDPO,
    ("local", "sft"): LocalSFT,
    ("local", "dpo"): LocalDPO,
    ("local", "grpo"): LocalGRPO,
    ("together", "grpo"): TogetherGRPO,
}


def earlier_epochs(ctx: TrainContext, backend: str) -> list[EpochRecord]:
    """The epochs of another method that a run of ``train.method`` continues (``sft -> dpo``), read from
    the fold's ``<fold>-epochs`` table (`epochwise.epochs.chain_before`); [] for a chain of one method.

    Why the table and not the cache: an earlier method's epoch keys hash that method's files (the chat
    rows of SFT epochs), which a DPO run does not read, so the run takes those epochs as recorded and
    trains the rest from the last of them. Without the table (another Prefect server), a DPO run on
    Together reads the fold's latest chain of completed jobs from Together's own list (`listed_chain`:
    the newest completed job and its ``from_checkpoint`` parents, each job's ``training_method``), so a
    switched chain continues there too instead of paying for a DPO chain from the base model.
    """
    recorded = records_from_table(ctx.fold.name, read_epochs(ctx.fold.name))
    if not recorded and backend == "together" and ctx.train.method != "sft":
        recorded = api_tagged(listed_chain, ctx.ops)(ctx.fold.name, ctx.together)
    return chain_before([r for r in recorded if r.backend == backend], ctx.train.method)


def training_method(ctx: TrainContext, backend: str, method: str | None = None) -> TrainingMethod:
    """The method for ``(backend, method)`` (default: ``train.method``), constructed for this run."""
    method = method or ctx.train.method
    try:
        chosen = METHODS[(backend, method)]
    except KeyError:
        known = ", ".join(f"{b}/{m}" for b, m in METHODS)
        raise UserError(f"no {method!r} training on the {backend!r} backend (available: {known})") from None
    return chosen(ctx)
