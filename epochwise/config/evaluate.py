"""Settings of ``epochwise evaluate`` / the ``evaluate-epochs`` flow: which epochs and metrics, how replies
are generated (greedy, ``max_new_tokens``), batching, Together concurrency and the price estimate."""

from __future__ import annotations

from pydantic import Field

from epochwise.config.base import Section


class EvaluateConfig(Section):
    """Defaults for scoring epochs on held-out folds (the CLI flags override them)."""

    epochs: str = Field("all", description="Epochs of FOLD to score: all, best (lowest val loss) or a list like 1,3.")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact"],
        description="exact, contains, labels, json-field:NAME or module:function; the first ranks --epoch best-eval.",
    )
    max_new_tokens: int = Field(256, gt=0, description="Longest generated reply (tokens), greedy decoding.")
    max_rows: int | None = Field(None, gt=0, description="Score at most this many val.jsonl rows per eval fold.")
    batch_size: int = Field(
        8, gt=0, description="Local backend: conversations per generate() batch (one cached chunk)."
    )
    chunk_rows: int = Field(16, gt=0, description="Together: rows per cached chunk (a killed run redoes at most one).")
    concurrency: int = Field(
        4, gt=0, description="Together: chat completions in flight at once (keep under your rate limit)."
    )
    tokens_per_s: float = Field(
        400.0,
        gt=0,
        description="Together: assumed endpoint throughput for the price estimate (tokens/s, all requests).",
    )
    startup_min: float = Field(10.0, ge=0, description="Together: minutes a new deployment bills before it is READY.")
    budget_usd: float | None = Field(
        None, gt=0, description="Stop before an epoch whose estimated endpoint price would exceed it."
    )
