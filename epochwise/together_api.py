"""The Together adapter: the only module that calls the ``together`` SDK for files and fine-tuning jobs.

Typed functions over a ``together.Together`` client; no Prefect here, so each is testable against the
fake server alone. Money rules live here too: a job is only created after Together's own job list
showed no live job with the epoch's deterministic suffix, and a failed create call is never blindly
retried (the job may exist although the reply was lost), the list is checked again first.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from together import APIConnectionError, APIStatusError, NotFoundError, Together

from epochwise.config.together import TogetherConfig
from epochwise.config.train import DPOParams, HyperParams
from epochwise.credentials import TogetherAccess, WandbAccess
from epochwise.epochs import EpochRecord
from epochwise.fold import fold_slug
from epochwise.problems import UserError

# Terminal job states (the status literal of together's types/finetune_response.py); jobs in the last three never count as "existing".
TERMINAL = ("completed", "cancelled", "error", "user_error")
FAILED = ("cancelled", "error", "user_error")
# Share of the job done, per status, for the progress artifact (Together gives no step counts on list).
PROGRESS = {"pending": 0.0, "queued": 0.05, "running": 0.4, "compressing": 0.85, "uploading": 0.95, "completed": 1.0}
VAL_LOSS_KEYS = ("eval/loss", "validation/loss", "val/loss", "eval_loss", "valid/loss")
SUFFIX_MAX = 40  # Together's limit on a job suffix


class TogetherFailure(RuntimeError):
    """Together rejected a file or a job, or a job ended badly; the message is Together's own."""


class LimitsExceeded(TogetherFailure, UserError):
    """The settings are outside Together's fine-tuning limits for the model: no job would be accepted."""


class JobFailed(TogetherFailure):
    """An epoch's job ended in error, user_error or cancelled."""

    def __init__(self, message: str, job_id: str, status: str) -> None:
        super().__init__(message)
        self.job_id, self.status = job_id, status


class BudgetExceeded(RuntimeError):
    """The next epoch's estimated price would take the fold over its budget; nothing was submitted."""


class TogetherUnreachable(TogetherFailure):
    """Together stayed unreachable (connection errors, timeouts, 429, 5xx) for longer than the tolerance."""


T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed call says nothing about the job: connection refused or reset, a timeout
    (``APITimeoutError`` is an ``APIConnectionError``), 429, or a 5xx, after the SDK's own retries."""
    if isinstance(exc, APIConnectionError):
        return True
    return isinstance(exc, APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500)


@dataclass
class OutageGuard:
    """Rides out a Together outage in a read-only wait: each call is retried on a transient failure
    (`is_transient`) with backoff ``backoff_s`` -> ``backoff_max_s`` until ``tolerance_s`` have passed
    since the first failing call started, then `TogetherUnreachable` names what keeps running, the API
    base and that a rerun re-attaches. Any other error is raised at once; a success resets the clock.

    ``subject`` says what keeps going meanwhile, e.g. ``"job ft-1 keeps running"``.
    """

    subject: str
    base_url: str
    tolerance_s: float
    backoff_s: float
    backoff_max_s: float
    log: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    since: float | None = None  # clock() when the first failing call of the current outage started
    since_hhmm: str = ""

    def call(self, fn: Callable[[], T]) -> T:
        wait = self.backoff_s
        while True:
            started, started_hhmm = self.clock(), datetime.now().astimezone().strftime("%H:%M")
            try:
                result = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self.since is None:
                    self.since, self.since_hhmm = started, started_hhmm
                    self.log(f"Together unreachable since {self.since_hhmm}; {self.subject} ({_reason(exc)})")
                down = self.clock() - self.since
                if down >= self.tolerance_s:
                    raise TogetherUnreachable(
                        f"Together at {self.base_url} unreachable for {down:.0f} s (since {self.since_hhmm}, "
                        f"{_reason(exc)}), longer than together.outage_tolerance_s={self.tolerance_s:g}; "
                        f"{self.subject} at Together: a rerun re-attaches to it"
                    ) from None
                self.sleep(min(wait, self.tolerance_s - down))
                wait = min(wait * 2, self.backoff_max_s)
                continue
            if self.since is not None:
                self.log(f"Together reachable again after {self.clock() - self.since:.0f} s; {self.subject}")
                self.since = None
            return result


def _reason(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return f"HTTP {exc.status_code}"
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {cause or exc}"


def make_client(access: TogetherAccess, cfg: TogetherConfig) -> Together:
    """A client for ``access`` with the configured SDK retries and read timeout.

    One client per (key, API base, project, retries, timeout) and process: building one loads the CA
    bundle into a new SSL context (~60 ms here), and every task of a run asks for one. The SDK's
    client holds an httpx connection pool, which is safe to share between threads.
    """
    return _client_for(
        access.api_key.get_secret_value(), access.base_url, access.project_id, cfg.max_retries, cfg.request_timeout_s
    )


@functools.lru_cache(maxsize=16)
def _client_for(api_key: str, base_url: str, project_id: str | None, max_retries: int, timeout: float) -> Together:
    return Together(api_key=api_key, base_url=base_url, project_id=project_id, max_retries=max_retries, timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """An uploaded, server-validated file."""

    id: str
    sha256: str
    purpose: str
    filename: str
    bytes: int


def upload_file(
    client: Together,
    path: Path | str,
    sha256: str,
    cfg: TogetherConfig,
    purpose: str = "fine-tune",
    log: Callable[[str], None] = print,
    check: bool = True,
) -> RemoteFile:
    """The validated Together file holding ``path``'s bytes: one found in ``files.list()`` (`find_uploaded`),
    else a 3-step presigned upload under `remote_filename`, then a wait for Together's validation.

    ``check``: let the SDK run its ``check_file`` over the bytes before sending them; False when that
    very check already passed for these bytes (`epochwise.validation_record.together_checked`).
    Raises `TogetherFailure` with Together's validation report on INVALID_FORMAT / FAILED.
    """
    path = Path(path)
    size = path.stat().st_size
    listed = client.files.list().data or []
    found = _listed_file(listed, sha256, size, purpose, "COMPLETED")
    if found is not None:
        log(f"{path.name}: reusing {found.id} ({found.filename}, {size} bytes), already uploaded and validated")
        return found
    # Uploaded by a run that stopped while Together validated it (all its bytes arrived, recently enough
    # to pass before file_deadline_s): wait for that validation, not a second upload.
    validating = _listed_file(listed, sha256, size, purpose, "PENDING", time.time() - cfg.file_deadline_s)
    if validating is not None:
        log(f"{path.name}: {validating.id} ({validating.filename}) is already uploaded; waiting for its validation")
        try:
            wait_for_file(client, validating.id, cfg, label=str(path))
            return validating
        except TogetherFailure as exc:
            log(f"{path.name}: {validating.id} did not pass ({exc}); uploading again")
    name = remote_filename(path, sha256)
    with _staging_dir(path) as tmp:
        # The SDK sends the path's own name as the file name: a link under the content-addressed name.
        named = Path(tmp) / name
        try:
            os.link(path, named)
        except OSError:
            shutil.copyfile(path, named)
        uploaded = client.files.upload(named, purpose=purpose, check=check)  # type: ignore[arg-type]
    log(f"uploaded {path.name} ({size} bytes) as {uploaded.id} ({name}); waiting for validation")
    wait_for_file(client, uploaded.id, cfg, label=str(path))
    return RemoteFile(uploaded.id, sha256, purpose, name, size)


def _staging_dir(path: Path) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory beside ``path`` (so a hard link works), else in the system's temp dir."""
    try:
        return tempfile.TemporaryDirectory(prefix=".ew-upload-", dir=path.parent)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="ew-upload-")


HASH_CHARS = 16  # sha256 hex digits in an uploaded file's name: 64 bits, with the byte count to match


def remote_filename(path: Path | str, sha256: str) -> str:
    """``<stem>-<first 16 hex of sha256><ext>``: Together keeps the name it was sent, so a later run on
    any machine finds the upload again by content in ``files.list()`` (Together lists no checksum)."""
    path = Path(path)
    return f"{path.stem}-{sha256[:HASH_CHARS]}{path.suffix}"


def find_uploaded(client: Together, sha256: str, size: int, purpose: str) -> RemoteFile | None:
    """The newest listed file with ``sha256``'s prefix in its name, exactly ``size`` bytes, ``purpose``
    and ``processing_status`` COMPLETED; None when there is none (then the caller uploads)."""
    return _listed_file(client.files.list().data or [], sha256, size, purpose, "COMPLETED")


def _listed_file(
    files: list[Any], sha256: str, size: int, purpose: str, status: str, newer_than: float = 0
) -> RemoteFile | None:
    """`find_uploaded`'s choice among ``files`` for ``status``, created after ``newer_than`` (Unix seconds)."""
    tag = f"-{sha256[:HASH_CHARS]}."
    matches = [
        f
        for f in files
        if tag in (f.filename or "")
        and f.bytes == size
        and f.purpose == purpose
        and str(f.processing_status or "").upper() == status
        and (f.created_at or 0) > newer_than
    ]
    if not matches:
        return None
    best = max(matches, key=lambda f: f.created_at or 0)
    return RemoteFile(best.id, sha256, purpose, best.filename or "", size)


def wait_for_file(
    client: Together, file_id: str, cfg: TogetherConfig, label: str = "", sleep: Callable[[float], None] = time.sleep
) -> None:
    """Poll ``processing_status`` until COMPLETED; fail on INVALID_FORMAT / FAILED or the deadline."""
    deadline = time.monotonic() + cfg.file_deadline_s
    while True:
        info = client.files.retrieve(file_id)
        status = (info.processing_status or "COMPLETED").upper()
        if status == "COMPLETED":
            return
        if status in ("INVALID_FORMAT", "FAILED"):
            report = info.validation_report
            reason = (report.error if report is not None else None) or "no report"
            raise TogetherFailure(f"{label or file_id}: Together rejected file {file_id} ({status}): {reason}")
        if time.monotonic() > deadline:
            raise TogetherFailure(
                f"{label or file_id}: file {file_id} still {status} after {cfg.file_deadline_s:.0f} s"
            )
        sleep(cfg.file_poll_s)


def file_exists(client: Together, file_id: str) -> bool:
    """Whether Together still has ``file_id`` (files can be deleted or expire)."""
    try:
        info = client.files.retrieve(file_id)
    except NotFoundError:
        return False
    return (info.processing_status or "COMPLETED").upper() == "COMPLETED"


# ---------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------


def epoch_suffix(fold: str, epoch: int, key: str) -> str:
    """``ew-<fold>-e<k>-<8 hex of the epoch key>``: the same epoch of the same inputs always gets the same
    suffix, so a job created by a run that crashed is found again in Together's list."""
    suffix = f"ew-{fold_slug(fold)}-e{epoch}-{key[:8]}"
    assert len(suffix) <= SUFFIX_MAX, suffix
    return suffix


def parse_suffix(fold: str, suffix: str | None) -> int | None:
    """The epoch number if ``suffix`` belongs to ``fold``, else None."""
    match = re.fullmatch(rf"ew-{re.escape(fold_slug(fold))}-e(\d+)-[0-9a-f]{{8}}", suffix or "")
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class JobInfo:
    """What epochwise needs from a job listing or retrieve."""

    id: str
    status: str
    suffix: str | None
    model_output_name: str | None
    created_at: str | None
    from_checkpoint: str | None = None
    model_object_id: str | None = None
    method: str = "sft"  # the job's training_method ("sft" when Together lists none)

    @property
    def progress(self) -> float:
        return PROGRESS.get(self.status, 1.0 if self.status in TERMINAL else 0.0)


def _info(job: Any) -> JobInfo:
    data = job.model_dump(by_alias=True, warnings=False) if hasattr(job, "model_dump") else dict(job)
    suffix = data.get("suffix")
    return JobInfo(
        id=data["id"],
        status=str(data.get("status") or ""),
        suffix=suffix,
        model_output_name=data.get("model_output_name") or data.get("output_name"),
        created_at=str(data.get("created_at") or ""),
        from_checkpoint=data.get("from_checkpoint"),
        model_object_id=data.get("model_object_id"),
        method=_method_name(data.get("training_method")),
    )


def _method_name(value: Any) -> str:
    """``training_method`` of a listed job: an object ``{"method": "dpo", ...}`` (together 3.1.1's
    TrainingMethodSFT / TrainingMethodDPO), a bare name, or absent (SFT)."""
    if isinstance(value, dict):
        value = value.get("method")
    return str(value) if value else "sft"


def list_jobs(client: Together) -> list[JobInfo]:
    """Every fine-tuning job of the account (the API has no pagination or filter)."""
    return [_info(job) for job in client.fine_tuning.list().data or []]


def live_jobs(client: Together, suffix: str) -> list[JobInfo]:
    """Jobs with ``suffix`` that are not failed or cancelled, oldest first (`age_order`)."""
    return sorted((j for j in list_jobs(client) if _has_suffix(j, suffix) and j.status not in FAILED), key=age_order)


def find_job(client: Together, suffix: str) -> JobInfo | None:
    """The job to re-attach to: a completed one with ``suffix``, else the oldest live one.

    Oldest, like `settle_duplicates`, so every run that finds two racing jobs picks the same one.
    """
    live = live_jobs(client, suffix)
    return next((j for j in live if j.status == "completed"), live[0] if live else None)


def age_order(job: JobInfo) -> tuple[datetime, str]:
    """Sort key oldest first: Together's ``created_at``, then the job id (the same order on every host)."""
    try:
        created = datetime.fromisoformat((job.created_at or "").replace("Z", "+00:00"))
    except ValueError:
        created = datetime.max.replace(tzinfo=UTC)
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return created, job.id


def settle_duplicates(
    client: Together,
    own: JobInfo,
    suffix: str,
    cfg: TogetherConfig,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> JobInfo:
    """After creating ``own`` with ``suffix``: the epoch's one job to continue on; other live ones are cancelled.

    Two runs on different machines can both find no job and both create one. Together's list may lag a
    create, so it is read until it shows ``own`` (at most ``cfg.list_catchup_s``): from then on it holds
    every job created before ``own`` too. The oldest live job with the suffix (`age_order`, the same
    choice on every host) is kept and the others, seconds old, are cancelled at once. Both racers reach
    the same decision, so both continue on the kept job.
    """
    deadline = time.monotonic() + cfg.list_catchup_s
    while True:
        listed = [j for j in list_jobs(client) if _has_suffix(j, suffix)]
        if any(j.id == own.id for j in listed):  # the other racer may have cancelled it already
            break
        if time.monotonic() > deadline:
            log(f"{own.id} is not in Together's job list after {cfg.list_catchup_s:.0f} s; continuing on it")
            return own
        sleep(cfg.list_poll_s)
    live = sorted((j for j in listed if j.status not in FAILED), key=age_order)
    if not live:  # cancelled from outside (e.g. `epochwise abort`): waiting on it reports that
        return own
    kept, duplicates = live[0], live[1:]
    for job in duplicates:
        try:
            status = cancel_job(client, job.id)
        except APIStatusError as exc:  # e.g. already cancelled by the other racer
            status = f"not cancelled ({exc.status_code}: {api_message(exc)})"
        log(f"duplicate job {job.id} for {suffix} (created {job.created_at}): {status}; keeping {kept.id}")
    return kept


def _has_suffix(job: JobInfo, suffix: str) -> bool:
    # Output names look like "<user>/<base>-<suffix>-<hash>"; older listings may omit the suffix field.
    return job.suffix == suffix or (job.suffix is None and f"-{suffix}-" in (job.model_output_name or ""))


def latest_chain(jobs: list[tuple[int, JobInfo]]) -> list[JobInfo]:
    """The chain of completed jobs ending at the newest completed job of ``jobs`` (`fold_jobs`): that
    job, its ``from_checkpoint`` parent (epoch - 1), ... back to epoch 1. [] when the links break (a
    parent not listed, not completed or not the epoch before), so nothing is guessed."""
    done = {j.id: (e, j) for e, j in jobs if j.status == "completed"}
    if not done:
        return []
    epoch, job = max(done.values(), key=lambda p: age_order(p[1]))
    chain = [job]
    while epoch > 1:
        parent = done.get((job.from_checkpoint or "").split(":")[0])
        if parent is None or parent[0] != epoch - 1:
            return []
        epoch, job = parent
        chain.append(job)
    return chain[::-1]


def chain_records(client: Together, fold: str) -> list[EpochRecord]:
    """`latest_chain` of the fold's listed jobs as epoch records, each with its job's method (losses
    are not read: a run continuing the chain needs jobs and methods only)."""
    chain = latest_chain(fold_jobs(client, fold))
    return [
        EpochRecord(
            fold=fold,
            epoch=epoch,
            backend="together",
            method=job.method if job.method in ("sft", "dpo") else "sft",
            job_id=job.id,
            model=job.model_output_name,
            parent=job.from_checkpoint,
        )
        for epoch, job in enumerate(chain, 1)
    ]


def fold_jobs(client: Together, fold: str) -> list[tuple[int, JobInfo]]:
    """``(epoch, job)`` for every job of ``fold`` in Together's list, oldest first."""
    found = [(parse_suffix(fold, j.suffix), j) for j in list_jobs(client)]
    return sorted(((e, j) for e, j in found if e is not None), key=lambda p: (p[0], p[1].created_at or ""))


@dataclass
class EpochRequest:
    """Everything one epoch job is created from; ``parent_job`` None means training the base model."""

    training_file: str
    validation_file: str | None
    base_model: str
    parent_job: str | None
    suffix: str
    hyper: HyperParams
    wandb: WandbAccess | None = None
    wandb_project: str | None = None
    wandb_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    dpo: DPOParams | None = None  # a DPO job (training_method="dpo"); None: SFT

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``client.fine_tuning.create``: one epoch, ``lora`` always explicit.

        DPO (``dpo`` set): ``training_method="dpo"`` with ``dpo_beta``, ``rpo_alpha``, ``simpo_gamma`` and
        ``dpo_normalize_logratios_by_length``; ``train_on_inputs`` is left out, since together 3.1.1's
        ``create_finetune_request`` (together/lib/resources/fine_tuning.py) refuses it for any method but
        SFT. The SDK sends them as ``training_method={"method": "dpo", ...}``; a ``simpo_gamma`` above 0
        makes it train reference-free with length-normalised log-ratios.
        """
        h = self.hyper
        kwargs: dict[str, Any] = {
            "training_file": self.training_file,
            "n_epochs": 1,
            "learning_rate": h.learning_rate,
            "lr_scheduler_type": h.lr_scheduler,
            "min_lr_ratio": h.min_lr_ratio,
            "warmup_ratio": h.warmup_ratio,
            "batch_size": h.batch_size,
            "max_grad_norm": h.max_grad_norm,
            "weight_decay": h.weight_decay,
            "n_checkpoints": h.n_checkpoints,
            "train_on_inputs": h.train_on_inputs,
            "random_seed": h.seed,
            "suffix": self.suffix,
            # The sync and async SDK default lora differently (None vs True): always say what we mean.
            "lora": h.lora,
        }
        if h.lora:
            kwargs.update(
                lora_r=h.lora_r,
                lora_alpha=h.effective_lora_alpha,
                lora_dropout=h.lora_dropout,
                lora_trainable_modules=h.lora_trainable_modules,
            )
        if h.max_seq_length is not None:
            kwargs["max_seq_length"] = h.max_seq_length
        if self.dpo is not None:
            del kwargs["train_on_inputs"]
            kwargs.update(
                training_method="dpo",
                dpo_beta=self.dpo.beta,
                dpo_normalize_logratios_by_length=self.dpo.normalize_logratios_by_length,
            )
            if self.dpo.rpo_alpha is not None:
                kwargs["rpo_alpha"] = self.dpo.rpo_alpha
            if self.dpo.simpo_gamma is not None:
                kwargs["simpo_gamma"] = self.dpo.simpo_gamma
        if self.validation_file:
            # Without at least one evaluation there is no validation loss to pick the best epoch by.
            kwargs.update(validation_file=self.validation_file, n_evals=max(h.n_evals, 1))
        else:
            kwargs["n_evals"] = 0
        if self.parent_job:
            kwargs["from_checkpoint"] = self.parent_job
        else:
            kwargs["model"] = self.base_model
        if self.wandb is not None and self.wandb_project:
            kwargs.update(
                wandb_api_key=self.wandb.api_key.get_secret_value(),
                wandb_project_name=self.wandb_project,
                wandb_name=self.wandb_name,
            )
            if self.wandb.base_url:
                kwargs["wandb_base_url"] = self.wandb.base_url
            if self.wandb.entity:
                kwargs["wandb_entity"] = self.wandb.entity
        kwargs.update(self.extra)
        return kwargs


def estimate_price(client: Together, request: EpochRequest) -> float | None:
    """Together's price estimate for the epoch in USD, or None when it cannot estimate."""
    kw = request.create_kwargs()
    args: dict[str, Any] = {"training_file": kw["training_file"], "n_epochs": 1, "n_evals": kw["n_evals"]}
    if request.parent_job:
        args["from_checkpoint"] = request.parent_job
    else:
        args["model"] = request.base_model
    if request.validation_file:
        args["validation_file"] = request.validation_file
    # Together prices LoRA apart from full fine-tuning and DPO apart from SFT: the estimate names both,
    # as together 3.1.1's create does (``create_price_estimation_params``); left out, Together would
    # price a full fine-tune as LoRA.
    args["training_type"] = price_training_type(request.hyper)
    args["training_method"] = (
        dpo_price_method(request.dpo)
        if request.dpo is not None
        else {"method": "sft", "train_on_inputs": request.hyper.train_on_inputs}
    )
    answer = client.fine_tuning.estimate_price(**args)
    if not getattr(answer, "estimation_available", False):
        return None
    return float(answer.estimated_total_price)


def limit_problems(limits: Any, h: HyperParams, validation: bool) -> list[str]:
    """What in ``h`` a model's fine-tuning limits (``fine_tuning.model_limits``) refuse,
    each naming its setting; empty when every epoch's job fits. Together checks these when a job is
    created; together 3.1.1's create checks only the batch size and the sequence length before sending."""
    problems = []
    low, high = getattr(limits, "min_learning_rate", None), getattr(limits, "max_learning_rate", None)
    if low is not None and high is not None and not low <= h.learning_rate <= high:
        problems.append(f"train.hyper.learning_rate {h.learning_rate:g} is outside Together's {low:g}..{high:g}")
    n_evals = max(h.n_evals, 1) if validation else 0  # what create_kwargs sends
    for name, value, limit in (
        ("train.hyper.n_evals", n_evals, "max_num_evals"),
        ("train.hyper.n_checkpoints", h.n_checkpoints, "max_num_checkpoints"),
    ):
        most = getattr(limits, limit, None)
        if most is not None and value > most:
            problems.append(f"{name} {value} is above Together's {limit} {most}")
    max_rank = getattr(getattr(limits, "lora_training", None), "max_rank", None)
    if h.lora and max_rank is not None and h.lora_r > max_rank:
        problems.append(f"train.hyper.lora_r {h.lora_r} is above Together's max_rank {max_rank}")
    if not h.lora and getattr(limits, "supports_full_training", True) is False:
        problems.append("train.hyper.lora false: Together does not offer full training for this model")
    return problems


def check_limits(client: Together, model: str, h: HyperParams, validation: bool) -> None:
    """Raise `LimitsExceeded` when an epoch's job would be refused for `limit_problems`."""
    problems = limit_problems(client.fine_tuning.model_limits(model_name=model), h, validation)
    if problems:
        raise LimitsExceeded(f"Together would refuse every job on {model}: {'; '.join(problems)}")


def price_training_type(h: HyperParams) -> dict[str, Any]:
    """The ``training_type`` of an estimate-price call: the LoRA settings the job is created with, or full."""
    if not h.lora:
        return {"type": "Full"}
    return {
        "type": "Lora",
        "lora_r": h.lora_r,
        "lora_alpha": h.effective_lora_alpha,
        "lora_dropout": h.lora_dropout,
        "lora_trainable_modules": h.lora_trainable_modules,
    }


def dpo_price_method(dpo: DPOParams) -> dict[str, Any]:
    """The ``training_method`` of an estimate-price call for a DPO job, built as together 3.1.1's
    ``create_price_estimation_params`` builds it (together/lib/resources/fine_tuning.py)."""
    reference_free = (dpo.simpo_gamma or 0) > 0
    return {
        "method": "dpo",
        "dpo_beta": dpo.beta,
        "dpo_normalize_logratios_by_length": dpo.normalize_logratios_by_length or reference_free,
        "dpo_reference_free": reference_free,
        "rpo_alpha": dpo.rpo_alpha or 0,
        "simpo_gamma": dpo.simpo_gamma or 0,
    }


def create_job(
    client: Together,
    request: EpochRequest,
    cfg: TogetherConfig,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    listed: bool = False,
) -> tuple[JobInfo, bool]:
    """Find the epoch's live job by suffix, else create it. Returns ``(job, created)``.

    The create call itself runs without SDK retries: a 5xx or a dropped connection may come after
    Together created the job, so each retry starts by looking for the job in the list again. Once a
    create's reply was lost, a job found in the lagging list may not be the only one this call made
    (`settle_lost_creates`), so ``created`` is True then and the caller settles as after a create.
    ``listed``: the caller has just looked for the job (and holds the fold's lock), so the first
    attempt creates without reading the list again.
    """
    once = client.with_options(max_retries=0)
    last: Exception | None = None
    unsure = 0  # creates whose reply was lost after they reached Together: each may have made a job
    for attempt in range(cfg.create_attempts):
        existing = None if listed and attempt == 0 else find_job(client, request.suffix)
        if existing is not None:
            if unsure:
                return settle_lost_creates(client, request.suffix, unsure, cfg, log, sleep) or existing, True
            log(f"re-attaching to {existing.id} ({existing.status}), suffix {request.suffix}")
            return existing, False
        try:
            job = once.fine_tuning.create(**request.create_kwargs())
        except APIStatusError as exc:
            if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                raise TogetherFailure(f"Together refused the job ({exc.status_code}): {api_message(exc)}") from None
            last, unsure = exc, unsure + (exc.status_code != 429)  # a 429 is refused before any work
        except APIConnectionError as exc:
            never_sent = isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))
            last, unsure = exc, unsure + (not never_sent)
        else:
            info = _info(job)
            log(f"created {info.id} ({request.suffix}) from {request.parent_job or request.base_model}")
            return info, True
        log(f"create attempt {attempt + 1} failed ({type(last).__name__}); checking the job list before retrying")
        sleep(min(cfg.poll_initial_s, 5.0) * (attempt + 1))
    found = settle_lost_creates(client, request.suffix, unsure, cfg, log, sleep) if unsure else None
    if found is not None:  # the last replies were lost too, but Together made the job
        return found, True
    raise TogetherFailure(f"could not create job {request.suffix}: {last}")


def settle_lost_creates(
    client: Together,
    suffix: str,
    sent: int,
    cfg: TogetherConfig,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> JobInfo | None:
    """After ``sent`` creates of ``suffix`` whose replies were not all seen: the one job to continue on
    (`find_job`'s choice), the other live ones cancelled; None when none was made.

    Each create may have made a job that Together's list shows only later. Before the first one, the
    list held no live job with ``suffix`` (`create_job` looked), so the list is read until it shows
    ``sent`` live jobs (every create accounted for) or ``cfg.list_catchup_s`` has passed (a create
    that failed before Together stored it never shows).
    """
    deadline = time.monotonic() + cfg.list_catchup_s
    live = live_jobs(client, suffix)
    while len(live) < sent and time.monotonic() < deadline:
        sleep(cfg.list_poll_s)
        live = live_jobs(client, suffix)
    if not live:
        return None
    kept = next((j for j in live if j.status == "completed"), live[0])
    for job in live:
        if job.id != kept.id:
            try:
                status = cancel_job(client, job.id)
            except APIStatusError as exc:
                status = f"not cancelled ({exc.status_code}: {api_message(exc)})"
            log(f"duplicate job {job.id} for {suffix} from a create whose reply was lost: {status}; keeping {kept.id}")
    log(f"continuing on {kept.id} ({kept.status}), suffix {suffix}, after {sent} create(s) whose replies were not all seen")
    return kept


def api_message(exc: APIStatusError) -> str:
    """Together's own error message from an SDK exception."""
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc)


def get_job(client: Together, job_id: str) -> JobInfo:
    return _info(client.fine_tuning.retrieve(job_id))


def job_events(client: Together, job_id: str) -> list[dict[str, Any]]:
    return [e.model_dump(warnings=False) for e in client.fine_tuning.list_events(job_id).data or []]


def failure_message(client: Together, job_id: str) -> str:
    """Together's own explanation of a failed job: its last error-level event."""
    errors = [e for e in job_events(client, job_id) if str(e.get("level") or "").endswith("error")]
    return errors[-1]["message"] if errors else "no error event"


def poll_job(
    client: Together,
    job_id: str,
    cfg: TogetherConfig,
    on_update: Callable[[JobInfo, list[str]], None],
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> JobInfo:
    """Poll until a terminal state with backoff ``poll_initial_s`` -> ``poll_max_s``.

    ``on_update(job, new_event_lines)`` is called when the status changed (the first status call
    included), and events are fetched only then: a quiet 10-hour job costs one request per poll and
    nothing more, here or in what ``on_update`` writes (a progress artifact is one Prefect server write
    per call). Polling is read-only, so an outage is ridden out for ``outage_tolerance_s``
    (`OutageGuard`) while the job keeps running.
    """
    guard = job_outage_guard(client, job_id, cfg, log, sleep)
    deadline = time.monotonic() + cfg.job_deadline_s
    wait, last_status, seen = cfg.poll_initial_s, None, 0
    while True:
        job = guard.call(lambda: get_job(client, job_id))
        if job.status != last_status:
            lines: list[str] = []
            # No events for a job already done when first seen (a rerun re-checking finished epochs
            # needs no history).
            if not (last_status is None and job.status == "completed"):
                events = guard.call(lambda: job_events(client, job_id))
                lines = [f"{e.get('type')}: {e.get('message')}" for e in events[seen:]]
                seen = len(events)
            last_status = job.status
            on_update(job, lines)
        if job.status in TERMINAL:
            return job
        if time.monotonic() + wait > deadline:
            raise TogetherFailure(
                f"job {job_id} still {job.status} after {cfg.job_deadline_s:.0f} s; it keeps running at Together "
                "(rerun to re-attach, or `epochwise abort` to cancel)"
            )
        sleep(wait)
        wait = min(wait * cfg.poll_factor, cfg.poll_max_s)


def job_outage_guard(
    client: Together,
    job_id: str,
    cfg: TogetherConfig,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> OutageGuard:
    """The `OutageGuard` of a wait on ``job_id``: retries back off like the polls, for ``outage_tolerance_s``."""
    return OutageGuard(
        f"job {job_id} keeps running",
        api_base_url(client),
        cfg.outage_tolerance_s,
        cfg.poll_initial_s,
        cfg.poll_max_s,
        log=log,
        sleep=sleep,
    )


def api_base_url(client: Together) -> str:
    """The API base ``client`` talks to, as the user configured it (no trailing slash)."""
    return str(client.base_url).rstrip("/")


def job_losses(client: Together, job_id: str) -> tuple[float | None, float | None]:
    """(last training loss, last validation loss) from ``list_metrics``."""
    rows = client.fine_tuning.list_metrics(job_id).metrics or []
    train = next((r["train/loss"] for r in reversed(rows) if "train/loss" in r), None)
    val = next((r[k] for r in reversed(rows) for k in VAL_LOSS_KEYS if k in r), None)
    return train, val


def cancel_job(client: Together, job_id: str) -> str:
    """Ask Together to cancel; completed steps are still billed. Returns the new status."""
    return str(client.fine_tuning.cancel(job_id).status)


def job_step_losses(client: Together, job_id: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``(train, validation)`` losses of one job as ``(step, loss)`` pairs, from ``list_metrics``."""
    train: list[tuple[float, float]] = []
    val: list[tuple[float, float]] = []
    for row in client.fine_tuning.list_metrics(job_id).metrics or []:
        step = row.get("train/global_step")
        if step is None:
            continue
        if "train/loss" in row:
            train.append((float(step), float(row["train/loss"])))
        loss = next((row[k] for k in VAL_LOSS_KEYS if k in row), None)
        if loss is not None:
            val.append((float(step), float(loss)))
    return train, val
