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


class DPOParams(Section):
    """Direct preference optimisation (``train.method: dpo``); names follow Together's ``fine_tuning.create``."""

    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference.")
    rpo_alpha: float | None = Field(None, ge=0, description="Weight of an added NLL loss on the preferred reply.")
    simpo_gamma: float | None = Field(
        None, ge=0, description="SimPO margin; above 0 it trains reference-free with length-normalised log-ratios."
    )
    normalize_logratios_by_length: bool = Field(False, description="Divide each log-ratio by the reply's length.")


class GRPOParams(Section):
    """Group relative policy optimisation (``train.method: grpo``): G completions per prompt, scored by the
    ``train.rewards`` functions, advantages relative to the group's mean."""

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group size G).")
    max_new_tokens: int = Field(32, gt=0, description="Longest completion in tokens.")
    prompts_per_step: int = Field(2, gt=0, description="Prompts per optimizer step (x num_generations rows).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    beta: float = Field(0.0, ge=0, description="KL weight against the base model (0 = no reference model).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip range of the policy ratio.")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std.")
    tokenizer: str | None = Field(
        None,
        description="Together GRPO: tokenizer turning prompts into tokens and sampled tokens into text, an HF id "
        "or a local directory loaded with transformers (default: the base model's id); 'bytes' = UTF-8 bytes "
        "(offline tests only: a real model's token ids differ).",
    )


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
    method: Literal["sft", "dpo", "grpo"] = Field(
        "sft",
        description="sft (chat rows), dpo (preference rows) or grpo (prompt rows + rewards); epochs of one "
        "chain may switch method, each continuing from the previous epoch's model.",
    )
    rewards: list[str] = Field(
        default_factory=list,
        description="GRPO reward functions, 'module:function' or 'path/to/file.py:function'; each is called "
        "as fn(prompts, completions, **columns) -> list[float | None].",
    )
    hyper: HyperParams = Field(default_factory=HyperParams)
    dpo: DPOParams = Field(default_factory=DPOParams)
    grpo: GRPOParams = Field(default_factory=GRPOParams)
    stop_when_val_worsens: int | None = Field(
        None, ge=1, description="Stop the chain after N epochs without a better validation loss."
    )
    budget_usd: float | None = Field(None, gt=0, description="Stop before a Together epoch that would exceed it.")
    wandb_project: str | None = Field(None, description="W&B project; runs are grouped per fold.")

    def method_fields(self) -> dict[str, object]:
        """What the method adds to an epoch's key: nothing for SFT (so SFT keys stay what they were),
        the method's name and its own parameters otherwise (for GRPO the rewards' specs and the sha256 of
        their source files: an edited reward is a new epoch)."""
        if self.method == "sft":
            return {}
        fields: dict[str, object] = {"method": self.method}
        if self.method == "dpo":
            fields["dpo"] = self.dpo.model_dump(mode="json")
        if self.method == "grpo":
            from epochwise.rewards import reward_source_hash

            fields["grpo"] = self.grpo.model_dump(mode="json")
            fields["rewards"] = list(self.rewards)
            fields["reward_sources"] = [reward_source_hash(spec) for spec in self.rewards]
        return fields
