"""One local GRPO epoch on prompt rows, with our own loop on the SFT trainer's pieces (`epochwise.local.rl`).

Per optimizer step: ``P`` prompts (a seeded order per epoch), ``G = num_generations`` completions each
sampled from the current policy (temperature ``temperature``, no top-k/top-p cut, at most ``max_new_tokens``),
every reward function called on them (`epochwise.rewards.score`; ``None`` = does not apply), the rewards
summed per completion, advantages ``(r - mean_group)`` divided by the group's std when ``scale_rewards``,
then one gradient step on TRL's default GRPO loss (``loss_type="dapo"``, see
https://huggingface.co/docs/trl/main/en/grpo_trainer): ``-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon)
* A)`` per completion token, averaged over all completion tokens of the step, plus ``beta`` times the k3
estimate of the KL to the base model (the adapter disabled) when ``beta > 0``. Each batch of completions is
used for one step, so the ratio is 1 in value and the loss's gradient is the policy gradient.

Why our own loop and not TRL's ``GRPOTrainer``: the same exact mid-epoch resume and adapter-per-epoch
layout as SFT (TRL's checkpoints are per run, not per chained epoch), rewards checked and called through
`epochwise.rewards`, and a higher throughput on CPU (``bench/local_grpo.py`` runs both on the same model
and data).

Per epoch it reports each reward's mean and std over the training completions, the share of prompt groups
whose rewards were all equal (they give zero advantages: nothing is learnt from them), the KL to the base
model on the validation completions, and ``val_reward``: the mean summed reward of ``G`` completions per
validation prompt, sampled with a fixed seed so epochs are compared on the same random stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import MethodType
from typing import Any

import torch

from epochwise.config.local import LocalConfig
from epochwise.config.train import GRPOParams, TrainConfig
from epochwise.local import keys
from epochwise.local.rl import (
    Policy,
    RLEpochResult,
    RLStepCallback,
    identity,
    load_policy,
    optimizer_step,
    restore,
    right_padded,
    save_checkpoint,
    save_epoch,
    steps_of,
    token_logprobs,
)
from epochwise.local.trainer import generate
from epochwise.problems import UserError
from epochwise.rewards import Reward, as_completions, prompt_columns, read_prompt_rows, score

# Most groups with equal rewards means most prompts teach nothing (TRL reports it as frac_reward_zero_std).
ZERO_STD_WARNING = 0.5


def prompts_per_step(train: TrainConfig) -> int:
    """Prompts per optimizer step, after checking the batch constraints (a `UserError` when broken).

    An integer ``train.hyper.batch_size`` counts completions per step (as TRL's ``per_device_train_batch_size``
    does) and must be a multiple of ``num_generations``; otherwise ``train.grpo.prompts_per_step`` is used.
    """
    grpo = train.grpo
    if grpo.num_generations < 2:
        raise UserError(
            f"train.grpo.num_generations is {grpo.num_generations}: GRPO needs at least 2 completions per "
            "prompt (advantages are relative to the group)"
        )
    size = train.hyper.batch_size
    if isinstance(size, int):
        if size % grpo.num_generations:
            raise UserError(
                f"train.hyper.batch_size ({size}) counts completions per step and must be divisible by "
                f"train.grpo.num_generations ({grpo.num_generations}); e.g. {grpo.num_generations * max(1, size // grpo.num_generations)}"
            )
        return size // grpo.num_generations
    return grpo.prompts_per_step


def prompt_ids(tokenizer, messages: list[dict], max_len: int) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_len:]  # the end of a long prompt (the generation prompt) matters most


@contextmanager
def merged_lora(model) -> Iterator[None]:
    """While sampling, every LoRA linear runs as one plain linear with ``W + scaling * B @ A``.

    Generation calls each layer once per new token, and on a small model the LoRA wrapper's two extra
    matmuls and calls cost more than the layer itself. The merged weight is a new tensor computed from the
    unchanged base weight and the current LoRA weights at every step (peft's ``merge_adapter`` adds into
    the base weight in place and ``unmerge_adapter`` subtracts again, which drifts by rounding; a drifting
    base would break the bitwise match of a resumed run).
    """
    from peft.tuners.lora import Linear as LoraLinear

    swapped = []
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not LoraLinear or module.merged or module.disable_adapters:
                continue
            adapters = module.active_adapters
            if (
                len(adapters) != 1
                or adapters[0] in module.lora_variant
                or not isinstance(module.base_layer, torch.nn.Linear)
            ):
                continue
            name = adapters[0]
            base = module.base_layer
            weight = torch.addmm(
                base.weight, module.lora_B[name].weight, module.lora_A[name].weight, alpha=module.scaling[name]
            )

            def forward(self, x, *args, _weight=weight, _bias=base.bias, **kwargs):
                return torch.nn.functional.linear(x, _weight, _bias)

            swapped.append((module, module.__dict__.get("forward")))
            module.forward = MethodType(forward, module)
    try:
        yield
    finally:
        for module, previous in swapped:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@torch.no_grad()
def sample_completions(policy: Policy, prompts: list[list[int]], grpo: GRPOParams) -> list[list[int]]:
    """One sampled completion per prompt (token ids, with the end-of-turn token when it was reached)."""
    tokenizer, model = policy.tokenizer, policy.model
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    was_training = model.training
    model.eval()
    with merged_lora(model):
        out = model.generate(
            input_ids=ids.to(policy.device),
            attention_mask=mask.to(policy.device),
            max_new_tokens=grpo.max_new_tokens,
            do_sample=True,
            temperature=grpo.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            use_cache=True,
        )
    model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        completions.append(row[:cut])
    return completions


def reward_matrix(
    rewards: Sequence[Reward], prompts: list[list[dict]], texts: list[str], columns: Mapping[str, list]
) -> torch.Tensor:
    """``(completions, rewards)``; NaN where a reward returned None."""
    values = torch.full((len(texts), len(rewards)), float("nan"))
    completions = as_completions(texts)
    for j, reward in enumerate(rewards):
        for i, value in enumerate(score(reward, prompts, completions, columns)):
            if value is not None:
                values[i, j] = value
    return values


def advantages(total: torch.Tensor, group: int, scale: bool) -> tuple[torch.Tensor, int]:
    """Group-relative advantages and the number of groups whose rewards were all equal."""
    grouped = total.view(-1, group)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    adv = grouped - mean
    if scale:
        adv = adv / (std + 1e-4)
    return adv.flatten(), int((std.flatten() < 1e-6).sum())


def kl_k3(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference), ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    delta = ref - logps
    return torch.exp(delta) - delta - 1


class _Rollout:
    """One batch of prompts, their completions, texts and reward matrix."""

    def __init__(self, policy: Policy, rows: list[dict], ids: list[list[int]], grpo: GRPOParams, rewards) -> None:
        g = grpo.num_generations
        self.prompt_ids = [p for p in ids for _ in range(g)]
        self.completions = sample_completions(policy, self.prompt_ids, grpo)
        eos = policy.tokenizer.eos_token_id
        self.texts = [
            policy.tokenizer.decode([t for t in c if t != eos], skip_special_tokens=True) for c in self.completions
        ]
        prompts, columns = prompt_columns(rows)
        self.prompts = [p for p in prompts for _ in range(g)]
        self.columns = {k: [v for v in values for _ in range(g)] for k, values in columns.items()}
        self.rewards = reward_matrix(rewards, self.prompts, self.texts, self.columns)
        self.total = torch.nan_to_num(self.rewards, nan=0.0).sum(1)  # a None reward adds nothing

    def batch(self, index: list[int], device: torch.device, pad_id: int):
        rows = [self.prompt_ids[i] + self.completions[i] for i in index]
        ids, padding = right_padded(rows, pad_id, device)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for row, i in enumerate(index):
            start = len(self.prompt_ids[i])
            keep[row, start : start + len(self.completions[i])] = True
        return ids, padding, keep


def _base_logprobs(policy: Policy, ids, padding, keep, temperature: float) -> torch.Tensor:
    with torch.no_grad(), policy.model.disable_adapter():
        return token_logprobs(policy.model, ids, padding, keep, temperature)


def accumulate_completions(
    policy: Policy, grpo: GRPOParams, rollout: _Rollout, index: list[int], adv: torch.Tensor, step_tokens: int
) -> tuple[float, float]:
    """Forward and backward of the completions ``index`` of ``rollout`` with their advantages ``adv`` (the
    clipped surrogate plus ``beta`` x KL per token, over the ``step_tokens`` of the optimizer step); returns
    the loss and the summed KL of their tokens (0 without ``beta``).

    The autograd graph dies on return, so it never holds memory into the next step (`trainer.accumulate`
    says why that matters).
    """
    ids, padding, keep = rollout.batch(index, policy.device, policy.tokenizer.pad_token_id)
    logps = token_logprobs(policy.model, ids, padding, keep, grpo.temperature)
    ratio = torch.exp(logps - logps.detach())
    a = adv.to(logps.device)[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - grpo.epsilon, 1 + grpo.epsilon) * a)
    kl_sum = 0.0
    if grpo.beta > 0:
        kl = kl_k3(logps, _base_logprobs(policy, ids, padding, keep, grpo.temperature))
        per_token = per_token + grpo.beta * kl
        kl_sum = float((kl * keep).sum())
    loss = (per_token * keep).sum() / max(1, step_tokens)
    loss.backward()
    return float(loss.detach()), kl_sum


def train_grpo_epoch(
    fold: Path | str,
    epoch: int,
    model_name: str,
    train: TrainConfig,
    rewards: Sequence[Reward],
    local: LocalConfig,
    key: str,
    parent: str | None = None,
    on_step: RLStepCallback | None = None,
) -> RLEpochResult:
    """Train GRPO epoch ``epoch`` of ``fold`` from ``parent``; the finished epoch from disk when it exists."""
    fold = Path(fold).resolve()
    finished = keys.finished_metrics(fold, key, epoch, parent)
    if finished is not None:
        return RLEpochResult(**finished)
    hyper, grpo = train.hyper, train.grpo
    per_step = prompts_per_step(train)
    started_at = datetime.now(UTC).isoformat()
    files = keys.fold_files(fold, method="grpo")
    train_rows = read_prompt_rows(files["train"])
    val_rows = read_prompt_rows(files["val"]) if "val" in files else []
    policy = load_policy(fold, model_name, hyper, local, "grpo", parent)
    max_prompt = max(8, min(local.seq_length, hyper.max_seq_length or local.seq_length) - grpo.max_new_tokens)
    train_ids = [prompt_ids(policy.tokenizer, row["messages"], max_prompt) for row in train_rows]
    names = [r.name for r in rewards]

    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(hyper.seed * 100_003 + epoch))
    total_steps = steps_of(len(train_rows), per_step, local)
    policy.schedule(hyper, total_steps)
    ident = identity(key, epoch, parent, total_steps)
    checkpoint = keys.checkpoint_path(fold, key, epoch)
    state: dict[str, Any] = {
        "step": 0, "step_losses": [], "step_metrics": [], "tokens": 0, "seconds": 0.0, "groups": 0,
        "zero_groups": 0, "kl_sum": 0.0, "kl_tokens": 0,
        "sums": [0.0] * len(rewards), "squares": [0.0] * len(rewards), "counts": [0] * len(rewards),
        "total_sum": 0.0, "total_square": 0.0, "completions": 0,
    }  # fmt: skip
    torch.manual_seed(hyper.seed + epoch)  # the sampling stream of this epoch (restored on resume)
    resumed_from = restore(checkpoint, ident, policy, local, state)
    chunk = max(1, local.micro_batch_size)

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        picked = order[step * per_step : (step + 1) * per_step].tolist()
        rollout = _Rollout(policy, [train_rows[i] for i in picked], [train_ids[i] for i in picked], grpo, rewards)
        adv, zero_groups = advantages(rollout.total, grpo.num_generations, grpo.scale_rewards)
        count = len(rollout.completions)
        token_count = sum(len(c) for c in rollout.completions)
        step_loss, kl_sum = 0.0, 0.0
        for start in range(0, count, chunk):
            index = list(range(start, min(count, start + chunk)))
            loss, kl = accumulate_completions(policy, grpo, rollout, index, adv[index], token_count)
            step_loss += loss
            kl_sum += kl
        optimizer_step(policy, hyper)
        state["seconds"] += time.perf_counter() - t0
        state["tokens"] += token_count
        state["step"] = step + 1
        state["groups"] += len(picked)
        state["zero_groups"] += zero_groups
        state["kl_sum"] += kl_sum
        state["kl_tokens"] += token_count if grpo.beta > 0 else 0
        for j in range(len(rewards)):
            column = rollout.rewards[:, j]
            valid = column[~column.isnan()]
            state["sums"][j] += float(valid.sum())
            state["squares"][j] += float((valid**2).sum())
            state["counts"][j] += int(valid.numel())
        state["total_sum"] += float(rollout.total.sum())
        state["total_square"] += float((rollout.total**2).sum())
        state["completions"] += count
        metrics = {
            "loss": step_loss,
            "reward": float(rollout.total.mean()),
            "zero_std_share": zero_groups / len(picked),
            **{f"{n}_mean": float(rollout.rewards[:, j].nanmean()) for j, n in enumerate(names)},
        }
        metrics = {k: (0.0 if math.isnan(v) else v) for k, v in metrics.items()}
        state["step_losses"].append(step_loss)
        state["step_metrics"].append(metrics)
        if on_step is not None:
            on_step(step + 1, total_steps, metrics)
        if state["step"] % local.checkpoint_every == 0 and state["step"] < total_steps:
            save_checkpoint(checkpoint, ident, policy, state)

    metrics = _epoch_metrics(state, names)
    val_reward = None
    if val_rows:
        val = evaluate_prompts(policy, val_rows, grpo, rewards, max_prompt, hyper.seed, chunk)
        val_reward = val.pop("reward")
        metrics.update({f"val_{k}": v for k, v in val.items()})
    sample = None
    if local.sample_max_new_tokens:
        messages = [{"role": "user", "content": local.sample_prompt}] if local.sample_prompt else None
        messages = messages or (val_rows or train_rows)[0]["messages"]
        sample = generate(policy.model, policy.tokenizer, messages, local.sample_max_new_tokens, policy.device)
    result = RLEpochResult(
        fold=fold.name,
        epoch=epoch,
        method="grpo",
        run_key=key,
        adapter_dir=str(keys.epoch_dir(fold, key, epoch)),
        base_model=policy.base_path,
        parent=parent,
        train_loss=sum(state["step_losses"]) / max(1, len(state["step_losses"])),
        val_loss=None,
        val_reward=val_reward,
        metrics=metrics,
        tokens_per_s=state["tokens"] / state["seconds"] if state["seconds"] else 0.0,
        sample=sample,
        steps=total_steps,
        resumed_from_step=resumed_from,
        step_losses=state["step_losses"],
        step_metrics=state["step_metrics"],
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(),
        threads=policy.threads,
    )
    save_epoch(fold, key, policy, result)
    return result


def _mean_std(total: float, square: float, count: int) -> tuple[float, float]:
    if not count:
        return 0.0, 0.0
    mean = total / count
    return mean, math.sqrt(max(0.0, square / count - mean * mean))


def _epoch_metrics(state: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Each reward's mean and std over the epoch's completions, the summed reward's, the zero-std share, KL."""
    metrics: dict[str, float] = {}
    metrics["reward_mean"], metrics["reward_std"] = _mean_std(
        state["total_sum"], state["total_square"], state["completions"]
    )
    for j, name in enumerate(names):
        metrics[f"{name}_mean"], metrics[f"{name}_std"] = _mean_std(
            state["sums"][j], state["squares"][j], state["counts"][j]
        )
    metrics["zero_std_share"] = state["zero_groups"] / max(1, state["groups"])
    metrics["completion_tokens"] = state["tokens"] / max(1, state["completions"])
    if state["kl_tokens"]:
        metrics["train_kl"] = state["kl_sum"] / state["kl_tokens"]
    return metrics


@torch.no_grad()
def evaluate_prompts(
    policy: Policy,
    rows: list[dict],
    grpo: GRPOParams,
    rewards: Sequence[Reward],
    max_prompt: int,
    seed: int,
    chunk: int,
) -> dict[str, float]:
    """Mean summed reward (and each reward's mean) of ``G`` completions per validation prompt, sampled on a
    fixed random stream (the training stream is left as it was), and the KL to the base model on them."""
    ids = [prompt_ids(policy.tokenizer, row["messages"], max_prompt) for row in rows]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = _Rollout(policy, rows, ids, grpo, rewards)
    out = {"reward": float(rollout.total.mean())}
    for j, reward in enumerate(rewards):
        value = float(rollout.rewards[:, j].nanmean())
        out[f"{reward.name}_mean"] = 0.0 if math.isnan(value) else value
    was_training = policy.model.training
    policy.model.eval()
    kl_sum, tokens = 0.0, 0
    pad_id = policy.tokenizer.pad_token_id
    for start in range(0, len(rollout.completions), chunk):
        index = list(range(start, min(len(rollout.completions), start + chunk)))
        batch_ids, padding, keep = rollout.batch(index, policy.device, pad_id)
        logps = token_logprobs(policy.model, batch_ids, padding, keep, grpo.temperature)
        ref = _base_logprobs(policy, batch_ids, padding, keep, grpo.temperature)
        kl_sum += float((kl_k3(logps, ref) * keep).sum())
        tokens += int(keep.sum())
    policy.model.train(was_training)
    out["kl"] = kl_sum / max(1, tokens)
    return out
