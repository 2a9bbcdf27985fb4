"""Training settings shared by both backends (Together jobs and the local PEFT trainer)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from epochwise.config.base import Section


class HyperParams(Section):
    """Hyper-parameters of one epoch. Each epoch is its own job, so schedules restart every epoch.

    Default for chaining: a linear schedule with ``min_lr_ratio=1.0`` and no warmup, i.e. a constant
    learning rate, so N chained 1-epoch jobs behave like one N-epoch run at constant LR instead of
    N repeated warmup/decay cycles.
    """

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine"] = Field("linear", description="Schedule inside each epoch.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="Final LR as a share of the peak, per epoch.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of each epoch's steps spent warming up.")
    batch_size: int | Literal["max"] = Field("max", description="Batch size, or 'max' (Together's choice).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    lora: bool = Field(True, description="LoRA (True) or full fine-tuning (False).")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int | None = Field(None, gt=0, description="LoRA alpha (default 2 x rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_trainable_modules: str = Field("all-linear", description="Comma list of modules, or 'all-linear'.")
    n_evals: int = Field(1, ge=0, description="Evaluations per epoch (>= 1 gives a validation loss).")
    n_checkpoints: int = Field(1, ge=1, description="Checkpoints saved per epoch.")
    train_on_inputs: bool | Literal["auto"] = Field(False, description="Also train on prompt tokens.")
    max_seq_length: int | None = Field(None, gt=0, description="Longest sequence in tokens.")
    seed: int = Field(42, description="Training seed.")

    @property
    def effective_lora_alpha(self) -> int:
        """``lora_alpha``, or twice the rank when unset (what both backends train with)."""
        return self.lora_alpha or 2 * self.lora_r


class TrainConfig(Section):
    """What ``epoch-train`` trains and how; a flow parameter, a CLI target and a deployment parameter."""

    backend: Literal["auto", "together", "local"] = Field(
        "auto", description="'auto' = Together when an API key is configured, local otherwise."
    )
    base_model: str = Field(
        "openai/gpt-oss-20b", description="Together base model (gpt-oss models get Harmony parquet)."
    )
    local_model: str = Field(
        "tiny", description="Local model: 'tiny' (offline, random init), 'smollm2', an HF id or a path."
    )
    epochs: int = Field(3, ge=1, le=100, description="Total epochs; finished epochs are never redone.")
    hyper: HyperParams = Field(default_factory=HyperParams)
    stop_when_val_worsens: int | None = Field(
        None, ge=1, description="Stop the chain after N epochs without a better validation loss."
    )
    budget_usd: float | None = Field(None, gt=0, description="Stop before a Together epoch that would exceed it.")
    wandb_project: str | None = Field(None, description="W&B project; runs are grouped per fold.")
