"""Settings of the local PyTorch + PEFT trainer.

The hyper-parameters both backends share (learning rate, schedule, LoRA rank, seed, ...) live in
`epochwise.config.train.HyperParams`; this section only holds what a local run needs besides them:
sequence packing, micro batches, threads, checkpoints, the cache of built base models and the shape
of the offline ``tiny`` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from epochwise.config.base import Section


class TinyModel(Section):
    """Shape of the offline ``tiny`` model: a random-init Llama (~1.1M parameters with the defaults).

    Sized so the README job (3 epochs of the example fold, ~55k tokens each) finishes in well under
    3 minutes on 2 busy CPU cores: hidden 128 ran ~2,200 tokens/s on one thread at load average 7,
    hidden 256 ~900 tokens/s.

    Its byte-level BPE tokenizer is trained on the fold's text, so the vocabulary is small and fits the
    data; both are built once and cached by content hash under ``LocalConfig.cache_dir``.
    """

    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary incl. 256 byte tokens and specials.")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(344, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    init_seed: int = Field(0, description="Seed of the random init (independent of the training seed).")


class LocalConfig(Section):
    """Local trainer settings beyond the shared `HyperParams`.

    Effective batch = ``micro_batch_size x grad_accumulation`` sequences (packed blocks when packing);
    an integer ``train.hyper.batch_size`` overrides it by deriving ``grad_accumulation``.
    """

    seq_length: int = Field(
        512,
        gt=8,
        description="Tokens per packed block (or longest padded row); rows are cut to "
        "min(seq_length, train.hyper.max_seq_length).",
    )
    micro_batch_size: int = Field(4, gt=0, description="Sequences per forward pass.")
    grad_accumulation: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    data: Literal["chatml", "harmony"] = Field(
        "chatml", description="Train on the fold's ChatML JSONL (any model) or its Harmony parquet (gpt-oss)."
    )
    packing: bool = Field(
        True, description="Pack rows into seq_length blocks with position-id resets (rows stay independent)."
    )
    eval_batch_size: int = Field(8, gt=0, description="Sequences per forward pass during evaluation.")
    threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads (default: the cores this process may use that are not busy "
        "with other work). Set it for bitwise-identical reruns: the thread count changes summation order.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="'auto' = cuda when available, else cpu.")
    checkpoint_every: int = Field(
        20, gt=0, description="Optimizer steps between mid-epoch checkpoints (a killed run resumes from the last)."
    )
    cache_dir: Path = Field(
        Path("~/.cache/epochwise/models"), description="Where built base models (tiny, smollm2) are cached."
    )
    tiny: TinyModel = Field(default_factory=TinyModel)
    sample_prompt: str | None = Field(
        None, description="User message for the sample generation (default: the first validation prompt)."
    )
    sample_max_new_tokens: int = Field(64, ge=0, description="Tokens generated for the sample (0: no sample).")
    lock_wait_s: float | None = Field(
        None,
        ge=0,
        description="How long a run waits while another run (any host of this Prefect server) trains the "
        "same epoch, then reuses it (seconds; unset = as long as it takes).",
    )
    lock_lease_s: float = Field(
        120.0,
        ge=60,
        le=86400,
        description="Lease of that server-side lock, renewed while training; a dead holder's lease "
        "expires after this long (seconds).",
    )
    wandb_run_per: Literal["epoch", "fold"] = Field(
        "epoch", description="One W&B run per fold and epoch, or one per fold (resumed each epoch)."
    )

    def training_fields(self) -> dict[str, Any]:
        """The settings that change what is trained (cache and run keys); speed and logging knobs excluded.

        ``threads`` is left out on purpose: it changes floating-point summation order, not the recipe.
        """
        skip = {
            "threads",
            "device",
            "checkpoint_every",
            "cache_dir",
            "sample_prompt",
            "sample_max_new_tokens",
            "wandb_run_per",
            "eval_batch_size",
            "lock_wait_s",
            "lock_lease_s",
        }
        return self.model_dump(mode="json", exclude=skip)
