"""Weights & Biases adapter for local epochs: one W&B group per fold, one run per epoch (or per fold).

Only used when ``train.wandb_project`` is set. The API key is W&B's own business (``WANDB_API_KEY`` or
``wandb login``); it is never a parameter here. ``WANDB_MODE=offline`` works without a network: runs
are written under ``<dir>/wandb/offline-run-*`` and can be pushed later with ``wandb sync``.
Run ids are derived from the fold, the run key and the epoch, so a resumed epoch continues its run
instead of opening a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass
class WandbRun:
    """A started W&B run. Per-epoch runs use the optimizer step as W&B step; a per-fold run lets W&B
    count on across epochs (its step resumes with the run) and records the epoch's step as a metric."""

    run: Any
    per_epoch: bool = True
    epoch: int = 1

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.per_epoch:
            self.run.log(metrics, step=step)
        else:
            self.run.log({**metrics, "epoch": self.epoch, "epoch_step": step})

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if value is not None:
                self.run.summary[key] = value
        self.run.finish()


def start_run(
    project: str,
    fold: str,
    epoch: int,
    run_key: str,
    config: dict[str, Any],
    per: Literal["epoch", "fold"] = "epoch",
    directory: Path | str | None = None,
) -> WandbRun:
    """Open (or resume) the W&B run of ``fold``'s epoch ``epoch``; group = fold, so runs line up per fold."""
    import wandb

    if per == "epoch":
        run_id, name = f"{fold}-{run_key}-e{epoch}", f"{fold} epoch {epoch}"
    else:
        run_id, name = f"{fold}-{run_key}", fold
    run = wandb.init(
        project=project,
        group=fold,
        job_type="local-epoch",
        id=run_id,
        name=name,
        resume="allow",
        config={**config, "epoch": epoch, "run_key": run_key},
        dir=str(directory) if directory is not None else None,
        reinit="finish_previous",
    )
    return WandbRun(run, per_epoch=per == "epoch", epoch=epoch)
