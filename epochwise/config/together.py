"""How epochwise talks to Together (not secrets: those live in blocks or the environment)."""

from __future__ import annotations

from pydantic import Field

from epochwise.config.base import Section


class PostTrainingConfig(Section):
    """The model resource and session GRPO trains on (``client.post_training``); not part of any epoch key.

    Together bills a model resource per GPU-minute while it is READY
    (docs.together.ai/docs/post-training/limits-and-errors); epochwise stops it when the run ends.
    """

    gpu_type: str | None = Field(
        None, description="GPU type of the resource ('H100-80GB', 'B200-SXM'; default: Together's)."
    )
    generator_replicas: int = Field(1, ge=1, description="Generator (sampling) replicas; GRPO needs at least one.")
    inactive_timeout_s: int = Field(
        900, ge=300, le=86400, description="Together stops the resource after this long without operations (seconds)."
    )
    extend_expiry_s: int = Field(
        600, ge=60, le=86400, description="Expiry extension asked for while the rewards are computed (seconds)."
    )
    hours_per_epoch: float = Field(
        1.0, gt=0, description="Wall time the budget check assumes for one GRPO epoch (hours x price per hour)."
    )
    poll_s: float = Field(0.5, gt=0, description="Wait between operation and status polls (seconds).")
    ready_deadline_s: float = Field(3600.0, gt=0, description="Give up waiting for a READY resource (seconds).")
    op_deadline_s: float = Field(1800.0, gt=0, description="Give up waiting for one operation (seconds).")


class TogetherConfig(Section):
    """Together API behaviour: polling, deadlines, retries, where credentials come from.

    Polling starts at ``poll_initial_s`` and grows by ``poll_factor`` up to ``poll_max_s``: a job that
    finishes in a minute is noticed quickly, a 10-hour job costs ~600 status calls instead of 3600.
    """

    credentials_block: str | None = Field(
        None, description="Name of a saved TogetherCredentials block; unset = TOGETHER_API_KEY from the environment."
    )
    wandb_block: str | None = Field(
        None, description="Name of a saved WandbCredentials block; unset = WANDB_API_KEY from the environment."
    )
    poll_initial_s: float = Field(10.0, gt=0, description="First wait between job status calls (seconds).")
    poll_max_s: float = Field(60.0, gt=0, description="Longest wait between job status calls (seconds).")
    poll_factor: float = Field(1.5, ge=1.0, description="Growth of the wait after each status call.")
    job_deadline_s: float = Field(
        48 * 3600.0, gt=0, description="Give up waiting for one job after this long (seconds); the job keeps running."
    )
    file_poll_s: float = Field(2.0, gt=0, description="Wait between file processing_status calls (seconds).")
    file_deadline_s: float = Field(1800.0, gt=0, description="Give up on server-side file validation (seconds).")
    max_retries: int = Field(
        5,
        ge=0,
        description="SDK retries of 408/409/429/5xx per call (honours Retry-After); job creation is never blindly retried.",
    )
    request_timeout_s: float = Field(60.0, gt=0, description="HTTP read timeout per request (seconds).")
    outage_tolerance_s: float = Field(
        1800.0,
        gt=0,
        description="While waiting for a job or a deployment, keep retrying connection errors, timeouts, 429 "
        "and 5xx for this long after the first failure (seconds); the job keeps running at Together meanwhile.",
    )
    create_attempts: int = Field(
        4, ge=1, description="Tries to create a job; after each failure Together's job list is checked first."
    )
    fold_lock_wait_s: float = Field(
        600.0, ge=0, description="How long a run waits for another run of the same fold to finish submitting (seconds)."
    )
    fold_lease_s: float = Field(
        120.0,
        ge=60,
        le=86400,
        description="Lease of the per-fold server-side lock, renewed while held; a dead holder's lease "
        "expires after this long (seconds).",
    )
    list_catchup_s: float = Field(
        120.0,
        ge=0,
        description="After a create, how long to re-read Together's job list until it shows the new job, "
        "to find a job another machine created at the same time (seconds).",
    )
    list_poll_s: float = Field(1.0, gt=0, description="Wait between those job list reads (seconds).")
    upload_lock_hold_s: float = Field(
        3600.0,
        gt=0,
        description="Ignored: an upload lock is an OS file lock, freed the moment its holder dies "
        "(accepted so that older settings still load).",
        deprecated="upload locks are OS file locks now; upload_lock_hold_s has no effect",
    )
    post_training: PostTrainingConfig = Field(default_factory=PostTrainingConfig)
