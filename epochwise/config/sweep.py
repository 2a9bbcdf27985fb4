"""Settings of ``epochwise sweep``: how many trials, how many at once, the sampler, the pruner, the budget.

A sweep trains one epoch chain per trial (each chain is ``epoch-train`` with the trial's settings) and
asks Optuna (https://optuna.readthedocs.io) for the settings of the next trial; what it varies is the
search space file (``--space sweep.yaml``), not this section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from epochwise.config.base import Section


class SweepConfig(Section):
    """One hyper-parameter sweep over epoch chains of a fold."""

    trials: int = Field(8, ge=1, le=1000, description="Trials (epoch chains) in the whole sweep, resumed ones included.")
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Trials training at once (a Prefect concurrency limit); default 1 locally, 2 on Together.",
    )
    budget_usd: float | None = Field(
        None,
        gt=0,
        description="USD for the whole sweep: no trial starts, and no epoch is submitted, past it (Together).",
    )
    sampler: Literal["grid", "random", "tpe"] = Field(
        "tpe", description="grid (every combination of the listed values), random or tpe (Optuna's TPESampler)."
    )
    seed: int = Field(0, description="Seed of the sampler (the same seed proposes the same trials).")
    pruner: Literal["median", "none"] = Field(
        "median",
        description="median: stop a trial whose validation loss after an epoch is worse than the median of "
        "finished trials at that epoch, before its next epoch is submitted; none: train every chain fully.",
    )
    pruner_startup_trials: int = Field(2, ge=0, description="Trials that finish before any trial is pruned.")
    pruner_min_epochs: int = Field(1, ge=1, description="Epochs every trial trains before it may be pruned.")
