"""One local DPO epoch on preference rows, with our own loop on the SFT trainer's pieces (`epochwise.local.rl`).

Rows are Together's preference format: ``{"input": {"messages": [...]}, "preferred_output": [assistant],
"non_preferred_output": [assistant]}``. Each pair is scored as two sequences (the prompt rendered with the
model's chat template plus each reply); only the reply's tokens and its end-of-turn token count.

Loss (Rafailov et al. 2023, the ``sigmoid`` loss of TRL's ``DPOTrainer``): ``-log sigmoid(beta * ((c - c_ref)
- (r - r_ref)))`` with ``c``/``r`` the summed log-probabilities of the chosen / rejected reply (divided by
their length with ``normalize_logratios_by_length``); ``rpo_alpha`` adds that weight times the chosen reply's
mean NLL; ``simpo_gamma > 0`` trains reference-free (SimPO, Meng et al. 2024): ``-log sigmoid(beta * (c/|c| -
r/|r|) - gamma)``. Implicit rewards are ``beta * (logp - logp_ref)``; the reward accuracy is the share of
pairs whose chosen reward is above the rejected one, the margin their mean difference.

Reference model: the model the DPO chain started from, fixed for all its epochs (the base model, or the SFT
epoch a chain switched from), so chained epochs train like one multi-epoch DPO run and the validation
reward accuracy is comparable from epoch to epoch. Its log-probabilities are computed once per epoch,
before the first step (TRL's ``precompute_ref_log_probs``): no second model is held during the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import torch
import torch.nn.functional as F

from epochwise.config.local import LocalConfig
from epochwise.config.train import DPOParams, HyperParams
from epochwise.local import keys
from epochwise.local.data import IGNORE, chatml_row
from epochwise.local.models import load_base
from epochwise.local.rl import (
    Policy,
    RLEpochResult,
    RLStepCallback,
    identity,
    load_policy,
    optimizer_step,
    parent_metrics,
    restore,
    right_padded,
    save_checkpoint,
    save_epoch,
    steps_of,
    token_logprobs,
)
from epochwise.local.trainer import generate
from epochwise.problems import UserError


@dataclass(frozen=True)
class Reply:
    """One prompt + reply as token ids; ``keep`` marks the reply's tokens."""

    ids: list[int]
    keep: list[bool]

    @property
    def length(self) -> int:
        return sum(self.keep)


@dataclass(frozen=True)
class Pair:
    chosen: Reply
    rejected: Reply


def reply_tokens(prompt: list[dict], reply: dict, tokenizer, max_len: int) -> Reply | None:
    """The prompt and ``reply`` tokenised; only the final reply is kept (None when truncation cut it all)."""
    row = chatml_row([*prompt, {"role": "assistant", "content": reply.get("content") or ""}], tokenizer)
    labelled = {i for i, label in enumerate(row.labels) if label != IGNORE}
    if not labelled:
        return None
    # earlier assistant turns of a multi-turn prompt are context: keep only the last contiguous span
    start = max(labelled)
    while start - 1 in labelled:
        start -= 1
    ids = row.input_ids[:max_len]
    keep = [start <= i and row.labels[i] != IGNORE for i in range(len(ids))]
    keep[0] = False
    return Reply(ids, keep) if any(keep) else None


def read_pairs(path: Path, tokenizer, max_len: int) -> list[Pair]:
    """Every preference row of ``path`` as a pair; a row that is not one is a `UserError` naming its line."""
    pairs = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = orjson.loads(line)
            try:
                prompt = row["input"]["messages"]
                chosen, rejected = row["preferred_output"][0], row["non_preferred_output"][0]
            except (KeyError, IndexError, TypeError):
                raise UserError(
                    f"{path}:{number}: not a preference row (input.messages, preferred_output, non_preferred_output)"
                ) from None
            c, r = reply_tokens(prompt, chosen, tokenizer, max_len), reply_tokens(prompt, rejected, tokenizer, max_len)
            if c is not None and r is not None:
                pairs.append(Pair(c, r))
    return pairs


def sequence_logps(model, replies: list[Reply], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each reply and its token count."""
    ids, padding = right_padded([r.ids for r in replies], pad_id, device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(replies):
        keep[i, : len(r.keep)] = torch.tensor(r.keep)
    logps = token_logprobs(model, ids, padding, keep)
    return logps.sum(-1), keep.sum(-1).to(logps.dtype)


def dpo_terms(
    dpo: DPOParams, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the chosen / rejected implicit rewards; rows ``[:n]`` chosen, ``[n:]`` rejected."""
    simpo = dpo.simpo_gamma is not None and dpo.simpo_gamma > 0
    if simpo:
        ratios = logps / lengths
        logits = dpo.beta * (ratios[:n] - ratios[n:]) - dpo.simpo_gamma
        rewards = dpo.beta * ratios.detach()
    else:
        ratios = logps - ref
        if dpo.normalize_logratios_by_length:
            ratios = ratios / lengths
        logits = dpo.beta * (ratios[:n] - ratios[n:])
        rewards = dpo.beta * ratios.detach()
    loss = -F.logsigmoid(logits)
    if dpo.rpo_alpha:
        loss = loss + dpo.rpo_alpha * (-logps[:n] / lengths[:n])
    return loss, rewards[:n], rewards[n:]


@torch.no_grad()
def reference_logps(pairs: list[Pair], reference: str | None, policy: Policy, batch: int) -> torch.Tensor:
    """Summed log-probabilities of every pair under the reference, ``(len(pairs), 2)`` (chosen, rejected)."""
    if reference is None:
        model, context = policy.model, policy.model.disable_adapter()  # the base itself
    else:
        from peft import PeftModel

        base, _ = load_base(policy.base_path, policy.device)
        model, context = PeftModel.from_pretrained(base, reference), torch.no_grad()
    out = torch.zeros(len(pairs), 2)
    was_training = policy.model.training
    model.eval()
    with context:
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            replies = [p.chosen for p in chunk] + [p.rejected for p in chunk]
            logps, _ = sequence_logps(model, replies, policy.tokenizer.pad_token_id, policy.device)
            out[start : start + len(chunk), 0] = logps[: len(chunk)].cpu()
            out[start : start + len(chunk), 1] = logps[len(chunk) :].cpu()
    policy.model.train(was_training)
    return out


@torch.no_grad()
def evaluate_pairs(
    policy: Policy, pairs: list[Pair], ref: torch.Tensor, dpo: DPOParams, batch: int
) -> dict[str, float]:
    """Mean DPO loss, reward accuracy, margin and chosen / rejected rewards over ``pairs``."""
    was_training = policy.model.training
    policy.model.eval()
    losses, chosen, rejected = [], [], []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        n = len(chunk)
        logps, lengths = sequence_logps(
            policy.model, [p.chosen for p in chunk] + [p.rejected for p in chunk], policy.tokenizer.pad_token_id,
            policy.device,
        )  # fmt: skip
        reference = torch.cat([ref[start : start + n, 0], ref[start : start + n, 1]]).to(logps.device)
        loss, c, r = dpo_terms(dpo, logps, lengths, reference, n)
        losses.append(loss.cpu())
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    policy.model.train(was_training)
    loss, c, r = torch.cat(losses), torch.cat(chosen), torch.cat(rejected)
    return {
        "loss": float(loss.mean()),
        "reward_accuracy": float((c > r).float().mean()),
        "reward_margin": float((c - r).mean()),
        "chosen_reward": float(c.mean()),
        "rejected_reward": float(r.mean()),
    }


def pairs_per_step(hyper: HyperParams, local: LocalConfig) -> int:
    """Pairs per optimizer step: an integer ``hyper.batch_size``, else micro batch x accumulation."""
    if isinstance(hyper.batch_size, int):
        return hyper.batch_size
    return local.micro_batch_size * local.grad_accumulation


def accumulate_pairs(
    policy: Policy, dpo: DPOParams, chunk: list[Pair], ref: torch.Tensor, step_pairs: int
) -> tuple[float, float, float]:
    """Forward and backward of one micro batch of pairs (loss over the ``step_pairs`` of the optimizer step);
    returns its summed loss, how many pairs rank the chosen reply first, and the summed reward margin.

    ``ref`` holds the pairs' reference log-probabilities, ``(len(chunk), 2)``. The autograd graph dies on
    return, so it never holds memory into the next step (`trainer.accumulate` says why that matters).
    """
    replies = [p.chosen for p in chunk] + [p.rejected for p in chunk]
    logps, lengths = sequence_logps(policy.model, replies, policy.tokenizer.pad_token_id, policy.device)
    loss, c, r = dpo_terms(dpo, logps, lengths, torch.cat([ref[:, 0], ref[:, 1]]).to(logps.device), len(chunk))
    (loss.sum() / step_pairs).backward()
    return float(loss.sum()), float((c > r).float().sum()), float((c - r).sum())


def train_dpo_epoch(
    fold: Path | str,
    epoch: int,
    model_name: str,
    hyper: HyperParams,
    dpo: DPOParams,
    local: LocalConfig,
    key: str,
    parent: str | None = None,
    on_step: RLStepCallback | None = None,
) -> RLEpochResult:
    """Train DPO epoch ``epoch`` of ``fold`` from ``parent``; the finished epoch from disk when it exists.

    ``key`` is the run key (`keys.run_key` with ``TrainConfig.method_fields``).
    """
    fold = Path(fold).resolve()
    finished = keys.finished_metrics(fold, key, epoch, parent)
    if finished is not None:
        return RLEpochResult(**finished)
    started_at = datetime.now(UTC).isoformat()
    files = keys.fold_files(fold, method="dpo")
    policy = load_policy(fold, model_name, hyper, local, "dpo", parent)
    max_len = min(local.seq_length, hyper.max_seq_length or local.seq_length)
    train_pairs = read_pairs(files["train"], policy.tokenizer, max_len)
    val_pairs = read_pairs(files["val"], policy.tokenizer, max_len) if "val" in files else []
    if not train_pairs:
        raise UserError(f"{files['train']}: no preference pair to train on")
    # The chain's reference: a DPO parent passes its own on; any other parent (SFT epoch, base) is it.
    before = parent_metrics(parent)
    reference = before.get("reference") if before.get("method") == "dpo" else parent
    batch = local.micro_batch_size
    ref_train = reference_logps(train_pairs, reference, policy, local.eval_batch_size)
    ref_val = reference_logps(val_pairs, reference, policy, local.eval_batch_size) if val_pairs else None

    per_step = pairs_per_step(hyper, local)
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(hyper.seed * 100_003 + epoch))
    total_steps = steps_of(len(train_pairs), per_step, local)
    policy.schedule(hyper, total_steps)
    ident = identity(key, epoch, parent, total_steps)
    checkpoint = keys.checkpoint_path(fold, key, epoch)
    state: dict = {"step": 0, "step_losses": [], "step_metrics": [], "tokens": 0, "seconds": 0.0}
    torch.manual_seed(hyper.seed + epoch)
    resumed_from = restore(checkpoint, ident, policy, local, state)

    for step in range(state["step"], total_steps):
        t0 = time.perf_counter()
        chosen_idx = order[step * per_step : (step + 1) * per_step].tolist()
        step_loss, correct, margin, tokens = 0.0, 0.0, 0.0, 0
        for start in range(0, len(chosen_idx), batch):
            idx = chosen_idx[start : start + batch]
            chunk = [train_pairs[i] for i in idx]
            loss_sum, chunk_correct, chunk_margin = accumulate_pairs(
                policy, dpo, chunk, ref_train[idx], len(chosen_idx)
            )
            step_loss += loss_sum
            correct += chunk_correct
            margin += chunk_margin
            tokens += sum(len(p.chosen.ids) + len(p.rejected.ids) for p in chunk)
        optimizer_step(policy, hyper)
        state["seconds"] += time.perf_counter() - t0
        state["tokens"] += tokens
        state["step"] = step + 1
        n_step = len(chosen_idx)
        metrics = {"loss": step_loss / n_step, "reward_accuracy": correct / n_step, "reward_margin": margin / n_step}
        state["step_losses"].append(metrics["loss"])
        state["step_metrics"].append(metrics)
        if on_step is not None:
            on_step(step + 1, total_steps, metrics)
        if state["step"] % local.checkpoint_every == 0 and state["step"] < total_steps:
            save_checkpoint(checkpoint, ident, policy, state)

    val = evaluate_pairs(policy, val_pairs, ref_val, dpo, local.eval_batch_size) if ref_val is not None else {}
    steps_done = state["step_metrics"]
    metrics = {
        "train_reward_accuracy": sum(m["reward_accuracy"] for m in steps_done) / max(1, len(steps_done)),
        "train_reward_margin": sum(m["reward_margin"] for m in steps_done) / max(1, len(steps_done)),
        **{f"val_{k}": v for k, v in val.items() if k != "loss"},
    }
    sample = None
    if local.sample_max_new_tokens:
        prompt = local.sample_prompt
        messages = [{"role": "user", "content": prompt}] if prompt else _first_prompt(files)
        sample = generate(policy.model, policy.tokenizer, messages, local.sample_max_new_tokens, policy.device)
    result = RLEpochResult(
        fold=fold.name,
        epoch=epoch,
        method="dpo",
        run_key=key,
        adapter_dir=str(keys.epoch_dir(fold, key, epoch)),
        base_model=policy.base_path,
        parent=parent,
        train_loss=sum(state["step_losses"]) / max(1, len(state["step_losses"])),
        val_loss=val.get("loss"),
        val_reward=None,
        metrics=metrics,
        tokens_per_s=state["tokens"] / state["seconds"] if state["seconds"] else 0.0,
        sample=sample,
        steps=total_steps,
        resumed_from_step=resumed_from,
        step_losses=state["step_losses"],
        step_metrics=state["step_metrics"],
        reference=reference,
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(),
        threads=policy.threads,
    )
    save_epoch(fold, key, policy, result)
    return result


def _first_prompt(files: dict[str, Path]) -> list[dict]:
    with open(files.get("val") or files["train"], "rb") as handle:
        return orjson.loads(handle.readline())["input"]["messages"]
