"""The per-epoch record both backends produce, and the fold's epoch table built from those records."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class EpochRecord(BaseModel):
    """One finished (or failed) epoch of one fold: what was trained, where the model is, how it scored.

    For Together, ``model`` is the job's output model name and ``job_id`` the job; for the local
    backend, ``model`` is the adapter directory and ``job_id`` is None.
    """

    fold: str
    epoch: int = Field(ge=1)
    backend: Literal["together", "local"]
    status: str = "completed"
    job_id: str | None = None
    model: str | None = None
    parent: str | None = Field(None, description="What this epoch continued from (job id, adapter dir or base).")
    train_loss: float | None = None
    val_loss: float | None = None
    price_usd: float | None = None
    tokens_per_s: float | None = None
    sample: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


def best_epoch(records: list[EpochRecord]) -> EpochRecord | None:
    """The completed epoch with the lowest validation loss (the latest one when none has a loss)."""
    done = [r for r in records if r.status == "completed"]
    scored = [r for r in done if r.val_loss is not None]
    if scored:
        return min(scored, key=lambda r: (r.val_loss, r.epoch))
    return max(done, key=lambda r: r.epoch, default=None)


def epoch_table(records: list[EpochRecord]) -> list[dict[str, object]]:
    """Rows for the ``<fold>-epochs`` table artifact and the CLI, one per epoch in order."""
    best = best_epoch(records)
    rows = []
    for r in sorted(records, key=lambda r: r.epoch):
        rows.append(
            {
                "epoch": r.epoch,
                "status": r.status,
                "model": r.model or "",
                "job": r.job_id or "",
                "train loss": _fmt(r.train_loss),
                "val loss": _fmt(r.val_loss),
                "price $": "" if r.price_usd is None else f"{r.price_usd:.2f}",
                "tok/s": "" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                "best": "*" if best is not None and r.epoch == best.epoch else "",
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
