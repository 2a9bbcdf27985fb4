"""What local DPO and GRPO epochs share: the policy (LoRA on the parent's base), token log-probabilities,
mid-epoch checkpoints and the finished epoch's directory.

Both run their own loop on the SFT trainer's pieces (`epochwise.local.trainer`: threads, device, LoRA
model, AdamW continuing the parent's state, schedule, RNG states, atomic checkpoint and epoch writes), so
they keep its guarantees: one adapter per epoch in ``<fold>/local/<run key>/epoch-<k>/`` continuing from
the previous epoch's adapter (an SFT epoch's adapter may be the parent of a DPO or GRPO epoch), and a run
killed mid-epoch continues at the step after its last checkpoint with the same data order and the same
random stream, so its curve equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from epochwise.config.local import LocalConfig
from epochwise.config.train import HyperParams
from epochwise.local import keys
from epochwise.local.models import base_model_path, load_base, resolve_device
from epochwise.local.trainer import (
    _lora_model,
    _optimizer,
    _save_checkpoint,
    _save_epoch,
    _set_rng,
    attention_bias,
    lr_lambda,
    set_threads,
)
from epochwise.problems import UserError

# on_step(step, total_steps, metrics of the step): called after every optimizer step.
RLStepCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class RLEpochResult:
    """What one local DPO or GRPO epoch produced; also stored as ``epoch-<k>/metrics.json``."""

    fold: str
    epoch: int
    method: str
    run_key: str
    adapter_dir: str
    base_model: str
    parent: str | None
    train_loss: float
    val_loss: float | None
    val_reward: float | None
    metrics: dict[str, float]
    tokens_per_s: float
    sample: str | None
    steps: int
    resumed_from_step: int
    step_losses: list[float] = field(default_factory=list)
    step_metrics: list[dict[str, float]] = field(default_factory=list)
    reference: str | None = None  # DPO: the adapter the log-ratios are measured against (None: the base)
    started_at: str = ""
    finished_at: str = ""
    threads: int = 0


def parent_metrics(parent: str | None) -> dict[str, Any]:
    """The parent epoch's ``metrics.json`` ({} for the base model or an adapter without one)."""
    if not parent:
        return {}
    path = Path(parent) / keys.METRICS_FILE
    return json.loads(path.read_bytes()) if path.is_file() else {}


def policy_base(model_name: str, fold: Path, local: LocalConfig, method: str, parent: str | None) -> str:
    """The base the policy sits on: the parent adapter's own base (an SFT epoch's tiny model was built from
    the chat rows), else the base built for this method's files."""
    if parent:
        base = parent_metrics(parent).get("base_model")
        config = Path(parent) / "adapter_config.json"
        if not base and config.is_file():
            base = json.loads(config.read_bytes()).get("base_model_name_or_path")
        if base:
            return str(base)
    return base_model_path(model_name, fold, local, method)


@dataclass
class Policy:
    """The trainable LoRA model of one epoch with its optimizer and schedule."""

    model: Any
    tokenizer: Any
    device: torch.device
    threads: int
    base_path: str
    trainable: list[torch.nn.Parameter]
    names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    def schedule(self, hyper: HyperParams, total_steps: int) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(hyper, total_steps))


def load_policy(
    fold: Path, model_name: str, hyper: HyperParams, local: LocalConfig, method: str, parent: str | None
) -> Policy:
    """Threads, device, base model and the LoRA policy (``parent``'s adapter, or a fresh seeded one)."""
    if not hyper.lora:
        raise UserError("the local backend trains LoRA adapters only (set train.hyper.lora=true)")
    threads = set_threads(local)
    device = resolve_device(local)
    base_path = policy_base(model_name, fold, local, method, parent)
    model, tokenizer = load_base(base_path, device)
    model.config.use_cache = False
    model = _lora_model(model, hyper, parent)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, hyper, parent)
    return Policy(model, tokenizer, device, threads, base_path, trainable, names, optimizer)


def token_logprobs(
    model, input_ids: torch.Tensor, padding: torch.Tensor, keep: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of every kept token given the tokens before it, ``(batch, T)``, 0 elsewhere.

    ``input_ids``/``padding`` are right-padded rows, ``keep`` marks the tokens to score (never position 0).
    Logits are computed only at the positions that predict a kept token (the LM head over the whole
    vocabulary is most of a small model's time); they are divided by ``temperature`` like the sampler's.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = causal.get_input_embeddings().weight
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    hidden = causal.get_decoder()(
        input_ids=input_ids,
        position_ids=positions,
        attention_mask=attention_bias(positions, padding, embeddings.dtype),
        use_cache=False,
    ).last_hidden_state
    targets = keep[:, 1:]
    logits = causal.get_output_embeddings()(hidden[:, :-1][targets]).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.log_softmax(-1).gather(-1, input_ids[:, 1:][targets].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device)
    out[:, 1:][targets] = picked
    return out


def right_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, padding)`` of ``rows`` right-padded to the longest (padding: 1 = token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    padding = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        padding[i, : len(row)] = 1
    return ids.to(device), padding.to(device)


def steps_of(count: int, per_step: int, local: LocalConfig) -> int:
    """Optimizer steps of an epoch over ``count`` items, ``per_step`` a step, cut to ``local.max_steps``."""
    total = math.ceil(count / per_step)
    return min(total, local.max_steps) if local.max_steps is not None else total


def identity(key: str, epoch: int, parent: str | None, steps: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: same run, epoch, parent and step count."""
    return {"run": key, "epoch": epoch, "parent": parent, "steps": steps}


def save_checkpoint(path: Path, ident: dict[str, Any], policy: Policy, state: dict[str, Any]) -> None:
    _save_checkpoint(path, ident, policy.names, policy.model, policy.optimizer, policy.scheduler, state, policy.threads)


def restore(path: Path, ident: dict[str, Any], policy: Policy, local: LocalConfig, state: dict[str, Any]) -> int:
    """Continue a matching checkpoint into ``policy`` and ``state`` (in place); returns the step resumed from."""
    if not path.is_file():
        return 0
    saved = torch.load(path, weights_only=False)  # our own file, written by save_checkpoint
    if saved["identity"] != ident:
        return 0
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved["trainable"].items():
            params[name].copy_(tensor)
    policy.optimizer.load_state_dict(saved["optimizer"])
    assert policy.scheduler is not None
    policy.scheduler.load_state_dict(saved["scheduler"])
    state.clear()
    state.update(saved["state"])
    _set_rng(saved["rng"])
    if local.threads is None and saved.get("threads", policy.threads) != policy.threads:
        policy.threads = saved["threads"]  # the killed run's reduction order, so the curve matches exactly
        torch.set_num_threads(policy.threads)
    return int(state["step"])


def optimizer_step(policy: Policy, hyper: HyperParams) -> None:
    if hyper.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(policy.trainable, hyper.max_grad_norm)
    policy.optimizer.step()
    assert policy.scheduler is not None
    policy.scheduler.step()
    policy.optimizer.zero_grad(set_to_none=True)


def save_epoch(fold: Path, key: str, policy: Policy, result: RLEpochResult) -> None:
    """The finished epoch's directory (adapter, optimizer state, metrics), then its checkpoint dropped."""
    _save_epoch(Path(result.adapter_dir), policy.model, policy.optimizer, result)
    keys.checkpoint_path(fold, key, result.epoch).unlink(missing_ok=True)
