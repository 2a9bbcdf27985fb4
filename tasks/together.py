"""Prefect tasks for the Together backend: upload, launch, wait, metrics.

Thin wrappers over `epochwise.together_api`. What makes resume safe:

* ``upload_if_missing`` is cached on ``sha256(bytes) + purpose + API base`` (never the path, never the
  run id), SERIALIZABLE under an ``flock`` so two runs on a host never upload the same bytes twice. Without a
  cache record it first looks in Together's ``files.list()`` for the same content (sha256 prefix in
  the uploaded file's name, byte count, purpose, COMPLETED), so a new machine uploads nothing again.
* ``launch_epoch_job`` is cached on the epoch key (fold hashes, base model, epoch, hyper-parameters,
  parent). The flow opens it in a transaction with ``wait_for_job``, so its cache record is written only
  once the job completed; after a crash or a failed job the next run looks the job up in Together's
  list by its deterministic suffix and re-attaches, or resubmits when the job failed.
* Find-then-create runs under a per-fold OS file lock and a per-fold Prefect server lease: two runs of
  one fold never both submit, on one host or on two workers of one server, and a killed holder
  releases both (the file lock with its descriptor, the lease when it expires). Runs that share no lock
  (two hosts, each with its own ephemeral API) can still both create: after a create the job list is
  read until it shows the new job, the oldest live job of the epoch is kept and the others cancelled.

Credentials are resolved inside each task (blocks or environment) and never become parameters or results.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext

from blocks.credentials import resolve_together, resolve_wandb, together_client, together_configured
from epochwise import together_api as api
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import DPOParams, HyperParams, TrainConfig
from epochwise.epochs import EpochRecord, epoch_key
from epochwise.io import sha256_file
from epochwise.validation_record import together_checked
from tasks.cancellation import record_creating, record_job_owner, refuse_if_stopping
from tasks.locks import HostOnly, ServerLease, fold_guard, serialized_on_host

P = ParamSpec("P")
R = TypeVar("R")


def api_tagged(short: Task[P, R], ops: OpsConfig) -> Task[P, R]:
    """``short`` carrying the run's ``ops.together_api_tag``, so the tag limit `epochwise deployments apply`
    registers for that same tag caps it across flows and workers.

    Only the calls that create something at Together (uploads, job launches) get it. wait_for_job
    would hold its slot for the whole job (hours) and starve every other fold's uploads; one-shot reads
    (a file still there, a finished job's metrics) are a single GET each, fewer than the pollers make,
    while taking a slot costs each task run about 2 s with Prefect 3.8 (measured in
    bench/many_folds.py: 10 such runs per 2-epoch fold)."""
    return short.with_options(tags={*short.tags, ops.together_api_tag})


def _client(cfg: TogetherConfig):
    return together_client(cfg)


def api_base(cfg: TogetherConfig) -> str:
    """The Together API base in use (part of the upload and epoch keys)."""
    return resolve_together(cfg.credentials_block).base_url


def resolve_backend(backend: str, cfg: TogetherConfig) -> str:
    """``auto`` means Together when a key is configured, else the local trainer."""
    if backend != "auto":
        return backend
    return "together" if together_configured(cfg.credentials_block) else "local"


# ---------------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------------


def upload_key(ctx: TaskRunContext, params: dict) -> str:
    """``sha256(file bytes) + purpose + API base``: the same bytes for the same account upload once."""
    material = f"{sha256_file(params['path'])}|{params['purpose']}|{api_base(params['together'])}"
    return "together-upload-" + hashlib.sha256(material.encode()).hexdigest()


def upload_policy() -> CachePolicy:
    """Cached on `upload_key`, `serialized_on_host`: a second run of the same bytes waits for the first
    and reuses its upload, and a killed holder frees the lock at once."""
    return serialized_on_host(upload_key)


@task(cache_policy=upload_policy(), persist_result=True)
def upload_if_missing(path: str, purpose: str, together: TogetherConfig) -> api.RemoteFile:
    """Upload one fold file and wait for Together's validation; cached on its content. Without a cache
    record (new machine, wiped result storage) the file is first looked for in Together's own list."""
    client = _client(together)
    sha256 = sha256_file(path)
    # The SDK's own check_file before sending: skipped for bytes it already passed in our validation.
    check = not together_checked(path, sha256)
    return api.upload_file(client, path, sha256, together, purpose, log=get_run_logger().info, check=check)


@task(cache_policy=NO_CACHE)
def check_model_limits(model: str, hyper: HyperParams, validation: bool, together: TogetherConfig) -> None:
    """Fail before any upload when Together would refuse every epoch's job: the settings are outside its
    limits for ``model`` (learning rate, evaluations, checkpoints, LoRA rank, full training)."""
    api.check_limits(_client(together), model, hyper, validation)


@task(cache_policy=NO_CACHE)
def file_is_live(remote: api.RemoteFile, together: TogetherConfig) -> bool:
    """Whether a cached upload still exists at Together (files can be deleted or expire)."""
    return api.file_exists(_client(together), remote.id)


def ensure_uploaded(path: str, together: TogetherConfig, ops: OpsConfig, purpose: str = "fine-tune") -> api.RemoteFile:
    """The cached upload of ``path``, uploaded again if Together no longer has the cached file id."""
    upload = api_tagged(upload_if_missing, ops)
    remote = upload(path, purpose, together)
    if file_is_live(remote, together):
        return remote
    get_run_logger().warning(f"{remote.id} is gone at Together; uploading {path} again")
    return upload.with_options(refresh_cache=True)(path, purpose, together)


# ---------------------------------------------------------------------------------------------------
# Epoch jobs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochSpec:
    """What defines one epoch; ``key`` is the cache key and the source of the job suffix."""

    fold: str
    epoch: int
    base_model: str
    parent: str | None  # job id of the previous epoch; None for epoch 1
    file_hashes: tuple[str, ...]
    hyper: HyperParams
    api_base: str  # jobs of one Together account are not models of another
    method: dict = field(default_factory=dict)  # `TrainConfig.method_fields`: empty for SFT (keys unchanged)

    @property
    def key(self) -> str:
        hyper = {**self.hyper.model_dump(mode="json"), **self.method}
        return epoch_key([*self.file_hashes, self.api_base], self.base_model, self.epoch, hyper, self.parent)

    @property
    def suffix(self) -> str:
        return api.epoch_suffix(self.fold, self.epoch, self.key)

    @property
    def dpo(self) -> DPOParams | None:
        """The DPO parameters of a DPO epoch (from ``method``, so the job is what its key says); None: SFT."""
        if self.method.get("method") != "dpo":
            return None
        return DPOParams.model_validate(self.method["dpo"])


@dataclass(frozen=True)
class EpochJob:
    """A submitted (or re-attached) epoch job."""

    fold: str
    epoch: int
    job_id: str
    suffix: str
    parent: str | None
    price_usd: float | None
    created_at: str | None


def epoch_job_key(ctx: TaskRunContext, params: dict) -> str:
    return "together-epoch-" + params["spec"].key


def fold_lock(fold: str, together: TogetherConfig) -> contextlib.AbstractContextManager[ServerLease | HostOnly]:
    """The per-fold host lock and server lease around find-then-create of the fold's epoch jobs."""
    wait_s = together.fold_lock_wait_s
    busy = api.TogetherFailure(f"fold {fold} is being submitted by another run; waited {wait_s:.0f} s")
    return fold_guard(f"fold-{api.fold_slug(fold)}", wait_s, together.fold_lease_s, busy)


@task(cache_key_fn=epoch_job_key, persist_result=True)
def launch_epoch_job(
    spec: EpochSpec,
    train_file: str,
    val_file: str | None,
    train: TrainConfig,
    together: TogetherConfig,
    spent_usd: float = 0.0,
) -> EpochJob:
    """Find this epoch's live job in Together's list, or estimate its price and create it.

    Raises `BudgetExceeded` (nothing submitted) when ``spent_usd`` plus the estimate exceeds the budget.
    """
    log = get_run_logger()
    client = _client(together)
    wandb = resolve_wandb(together.wandb_block) if train.wandb_project else None
    request = api.EpochRequest(
        training_file=train_file,
        validation_file=val_file,
        base_model=spec.base_model,
        parent_job=spec.parent,
        suffix=spec.suffix,
        hyper=spec.hyper,
        wandb=wandb,
        wandb_project=train.wandb_project,
        wandb_name=f"{spec.fold}-epoch-{spec.epoch}",
        dpo=spec.dpo,
    )
    with fold_lock(spec.fold, together) as held:
        existing = api.find_job(client, spec.suffix)
        price = api.estimate_price(client, request)  # also for a re-attached job, so the fold's spend adds up
        log.info(f"epoch {spec.epoch}: estimated price " + ("unavailable" if price is None else f"${price:.2f}"))
        if existing is not None:
            log.info(f"epoch {spec.epoch}: re-attaching to {existing.id} ({existing.status})")
            record_job_owner(existing.id, log, together)  # this run owns it now: cancelling it cancels the job
            return EpochJob(spec.fold, spec.epoch, existing.id, spec.suffix, spec.parent, price, existing.created_at)
        if train.budget_usd is not None and price is not None and spent_usd + price > train.budget_usd:
            raise api.BudgetExceeded(
                f"epoch {spec.epoch} would cost ${price:.2f}; ${spent_usd:.2f} spent of the ${train.budget_usd:.2f} budget"
            )
        refuse_if_stopping(f"epoch {spec.epoch}'s job")
        held.check()  # LeaseLost if the fold's lease expired under a server outage: another run may submit
        record_creating(spec.suffix, log)  # a cancel during the create still finds the job by its suffix
        job, created = api.create_job(client, request, together, log=log.info, listed=True)  # listed just above
        record_job_owner(job.id, log, together)  # before anything else can fail or be interrupted
        if created:  # a run on another machine (another lock) may have created one at the same time
            kept = api.settle_duplicates(client, job, spec.suffix, together, log=log.warning)
            if kept.id != job.id:  # this run continues on the kept job: it owns that one too
                record_job_owner(kept.id, log, together)
            job = kept
    return EpochJob(spec.fold, spec.epoch, job.id, spec.suffix, spec.parent, price, job.created_at)


@task(cache_policy=NO_CACHE)
def wait_for_job(job: EpochJob, together: TogetherConfig) -> api.JobInfo:
    """Poll one job to a terminal state (one task per job, never cached: "running" is not a result).

    Logs status changes and Together's event lines, keeps a progress artifact, and raises
    `JobFailed` with Together's message when the job failed or was cancelled. A Together outage is
    ridden out for ``together.outage_tolerance_s``; past that it fails, and a rerun re-attaches.
    """
    log = get_run_logger()
    client = _client(together)
    progress = None  # created at the first poll that finds the job unfinished (a finished one needs none)

    def on_update(info: api.JobInfo, lines: list[str]) -> None:
        nonlocal progress
        for line in lines:
            log.info(f"{job.job_id} {line}")
        description = f"{job.fold} epoch {job.epoch}: job {job.job_id} {info.status}"
        if progress is None and info.status not in api.TERMINAL:
            progress = create_progress_artifact(progress=100 * info.progress, description=description)
        elif progress is not None:
            update_progress_artifact(artifact_id=progress, progress=100 * info.progress, description=description)

    info = api.poll_job(client, job.job_id, together, on_update, log=log.info)
    if info.status != "completed":
        message = api.failure_message(client, job.job_id)
        raise api.JobFailed(f"epoch {job.epoch} job {job.job_id} {info.status}: {message}", job.job_id, info.status)
    return info


@task(cache_policy=NO_CACHE)
def listed_chain(fold: str, together: TogetherConfig) -> list[EpochRecord]:
    """The fold's latest chain of completed epochs as Together lists it (`together_api.chain_records`):
    what a switched chain continues when Prefect has no ``<fold>-epochs`` table (a new machine)."""
    return api.chain_records(_client(together), fold)


def metrics_key(ctx: TaskRunContext, params: dict) -> str:
    return "together-metrics-" + params["job"].job_id


@task(cache_key_fn=metrics_key, persist_result=True)
def fetch_epoch_metrics(job: EpochJob, info: api.JobInfo, together: TogetherConfig) -> EpochRecord:
    """The finished epoch as an `EpochRecord`: output model, train and validation loss, price."""
    train_loss, val_loss = api.job_losses(_client(together), job.job_id)
    return EpochRecord(
        fold=job.fold,
        epoch=job.epoch,
        backend="together",
        status=info.status,
        job_id=job.job_id,
        model=info.model_output_name,
        parent=job.parent,
        train_loss=train_loss,
        val_loss=val_loss,
        price_usd=job.price_usd,
        started_at=_parse_time(job.created_at),
        finished_at=datetime.now(UTC),
    )


def _parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None
