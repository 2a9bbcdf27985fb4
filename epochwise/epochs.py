"""The epochs of a fold: the per-epoch record both backends produce, the fold's epoch table built from
those records and back, the ``<fold>-epochs`` artifact that holds the table (`publish_epochs` /
`read_epochs`; Prefect is imported only inside those two), and the choice of one epoch (`choose_epoch`:
``best`` or ``N``) for deploy, export, sample and ``deploy-info``."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class EpochRecord(BaseModel):
    """One finished (or failed) epoch of one fold: what was trained, where the model is, how it scored.

    For Together, ``model`` is the job's output model name and ``job_id`` the job; for the local
    backend, ``model`` is the adapter directory and ``job_id`` is None.
    """

    fold: str
    epoch: int = Field(ge=1)
    backend: Literal["together", "local"]
    method: Literal["sft", "dpo", "grpo"] = "sft"
    status: str = "completed"
    job_id: str | None = None
    model: str | None = None
    parent: str | None = Field(None, description="What this epoch continued from (job id, adapter dir or base).")
    train_loss: float | None = None
    val_loss: float | None = None
    val_reward: float | None = Field(None, description="GRPO: mean reward of the val prompts' completions.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="What the method measures besides losses (DPO margin, GRPO KL, ...)."
    )
    price_usd: float | None = None
    tokens_per_s: float | None = None
    sample: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


def best_epoch(records: list[EpochRecord]) -> EpochRecord | None:
    """The completed epoch with the lowest validation loss (the latest one when none has a loss).

    Only epochs of the latest epoch's method compete: a DPO loss or a GRPO reward is not on the scale
    of an SFT loss, so after ``sft -> dpo`` the best is the best DPO epoch. GRPO epochs are ranked by
    their validation reward (highest first).
    """
    done = [r for r in records if r.status == "completed"]
    if done:
        method = max(done, key=lambda r: r.epoch).method
        done = [r for r in done if r.method == method]
        if method == "grpo":
            rewarded = [r for r in done if r.val_reward is not None]
            if rewarded:
                return max(rewarded, key=lambda r: (r.val_reward, -r.epoch))
    scored = [r for r in done if r.val_loss is not None]
    if scored:
        return min(scored, key=lambda r: (r.val_loss, r.epoch))
    return max(done, key=lambda r: r.epoch, default=None)


class EpochChoiceError(ValueError):
    """``best`` / ``N`` names no usable epoch. ``missing`` is the epoch number asked for when it was not
    among ``known`` (the epochs there are), so a caller can word that case for its own source."""

    def __init__(self, message: str, missing: int | None = None, known: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing, self.known = missing, known


def choose_epoch(records: list[EpochRecord], which: str | int) -> EpochRecord:
    """``best`` (lowest validation loss, `best_epoch`) or epoch ``N``; the chosen epoch must be completed."""
    if str(which).lower() == "best":
        chosen = best_epoch(records)
        if chosen is None:
            raise EpochChoiceError("no completed epoch to deploy yet: run `epochwise train` first")
        return chosen
    if not str(which).isdigit():
        raise EpochChoiceError(f"epoch must be 'best' or a number, not {which!r}")
    number = int(which)
    chosen = next((r for r in records if r.epoch == number), None)
    if chosen is None:
        known = tuple(sorted(r.epoch for r in records))
        shown = ", ".join(map(str, known)) or "none"
        raise EpochChoiceError(f"epoch {number} was not trained (epochs: {shown})", missing=number, known=known)
    if chosen.status != "completed":
        raise EpochChoiceError(f"epoch {number} is {chosen.status}, not completed")
    return chosen


def epoch_table(records: list[EpochRecord]) -> list[dict[str, object]]:
    """Rows for the ``<fold>-epochs`` table artifact and the CLI, one per epoch in order."""
    best = best_epoch(records)
    methods = any(r.method != "sft" for r in records)  # SFT-only tables keep their columns
    rows = []
    for r in sorted(records, key=lambda r: r.epoch):
        rows.append(
            {
                "epoch": r.epoch,
                **({"method": r.method} if methods else {}),
                "status": r.status,
                "model": r.model or "",
                "job": r.job_id or "",
                "train loss": _fmt(r.train_loss),
                "val loss": _fmt(r.val_loss),
                **({"val reward": _fmt(r.val_reward), "metrics": metrics_cell(r)} if methods else {}),
                "price $": "" if r.price_usd is None else f"{r.price_usd:.2f}",
                "tok/s": "" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                "best": "*" if best is not None and r.epoch == best.epoch else "",
            }
        )
    return rows


# The per-epoch metrics a table row shows (the full set is in each record's ``metrics``): DPO's validation
# reward accuracy and margin, GRPO's training reward, the share of prompt groups with equal rewards, the KL.
TABLE_METRICS = {
    "val_reward_accuracy": "val acc",
    "val_reward_margin": "val margin",
    "reward_mean": "reward",
    "zero_std_share": "equal groups",
    "val_kl": "kl",
}


def metrics_cell(record: EpochRecord) -> str:
    """``val acc 0.95, val margin 0.41`` (DPO) or ``reward 0.29, equal groups 0.00, kl 0.03`` (GRPO)."""
    return ", ".join(f"{label} {record.metrics[key]:.2f}" for key, label in TABLE_METRICS.items() if key in record.metrics)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def records_from_table(fold: str, rows: list[dict[str, Any]]) -> list[EpochRecord]:
    """Epoch records back from `epoch_table` rows: a row with a job is a Together epoch, one without is local."""
    records = []
    for row in rows:
        loss = str(row.get("val loss") or "").strip()
        train = str(row.get("train loss") or "").strip()
        reward = str(row.get("val reward") or "").strip()
        price = str(row.get("price $") or "").strip()
        records.append(
            EpochRecord(
                fold=fold,
                epoch=int(row["epoch"]),
                backend="together" if row.get("job") else "local",
                method=row.get("method") or "sft",
                status=str(row.get("status") or "completed"),
                job_id=row.get("job") or None,
                model=row.get("model") or None,
                val_loss=float(loss) if loss else None,
                train_loss=float(train) if train else None,
                val_reward=float(reward) if reward else None,
                price_usd=float(price) if price else None,
            )
        )
    return records


def publish_epochs(fold: str, records: list[EpochRecord]) -> None:
    """Publish ``records`` as the fold's ``<fold>-epochs`` table artifact (a new version of the key)."""
    from prefect.artifacts import create_table_artifact

    from epochwise.artifacts import artifact_key

    create_table_artifact(
        epoch_table(records), key=artifact_key(fold, "epochs"), description=f"{fold}: one row per epoch"
    )


def read_epochs(fold: str) -> list[dict[str, Any]]:
    """The rows of the fold's latest ``<fold>-epochs`` artifact (what the last run recorded), or [].

    Without ``PREFECT_API_URL`` this is one read of Prefect's database, no server started
    (`epochwise.artifacts.latest_artifact_data`).
    """
    from epochwise.artifacts import artifact_key, latest_artifact_data

    data = latest_artifact_data(artifact_key(fold, "epochs"))
    return list(data) if data else []


def chain_before(records: list[EpochRecord], method: str) -> list[EpochRecord]:
    """The recorded epochs that a run of ``method`` keeps as they are and continues from.

    A chain may switch method (``sft`` epochs 1-3, then ``dpo`` from epoch 3's model): the leading
    completed epochs 1, 2, ... up to the last one trained with another method are kept; the run
    trains from the epoch after it. A chain of one method keeps nothing (its own epochs resume by their
    keys), so SFT runs are unchanged. ``records``: one fold's epochs of one backend.
    """
    by_epoch = {r.epoch: r for r in records}
    kept: list[EpochRecord] = []
    last_other = 0
    while (r := by_epoch.get(len(kept) + 1)) is not None and r.status == "completed":
        kept.append(r)
        if r.method != method:
            last_other = r.epoch
    return kept[:last_other]


def epoch_key(fold_hashes: list[str], base_model: str, epoch: int, hyper: dict[str, object], parent: str | None) -> str:
    """Content key of one epoch: the fold's file hashes, base model, epoch index, hyper-parameters and
    the model it continues from. Paths, times and run ids are deliberately not part of it."""
    payload = json.dumps(
        {"files": list(fold_hashes), "base": base_model, "epoch": epoch, "hyper": hyper, "parent": parent},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def val_stalled(records: list[EpochRecord], patience: int | None) -> bool:
    """True when the last ``patience`` completed epochs brought no validation loss below the best before them.

    Epochs without a validation loss count as not improving; ``None`` disables the rule. Only the
    latest method's epochs are compared (like `best_epoch`): after ``sft -> dpo`` a DPO loss is not on
    the scale of the SFT losses before it.
    """
    if not patience:
        return False
    done = sorted((r for r in records if r.status == "completed"), key=lambda r: r.epoch)
    done = [r for r in done if r.method == done[-1].method] if done else done
    if len(done) <= patience:
        return False
    before = [r.val_loss for r in done[:-patience] if r.val_loss is not None]
    if not before:
        return False
    best = min(before)
    return all(r.val_loss is None or r.val_loss >= best for r in done[-patience:])
