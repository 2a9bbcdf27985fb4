"""One epoch of LoRA training on CPU (or one GPU) with exact mid-epoch resume.

Supports: ChatML folds (assistant-only labels) and pre-tokenised parquet folds; packing with
position-id resets; AdamW over the LoRA parameters only; per-epoch linear or cosine schedule with
warmup (`HyperParams`); gradient clipping and accumulation (loss averaged over all labelled tokens
of an optimizer step); a seeded, reproducible data order; validation loss; a sample generation.

Resume: every ``checkpoint_every`` optimizer steps the LoRA weights, optimizer, scheduler, step
counter, running loss sums and RNG states go to ``checkpoint-epoch-<k>.pt`` (atomic write). A rerun
finds it, checks it belongs to the same run, epoch and parent, and continues at the next step with
the same data order, so the loss curve of a killed-and-resumed run equals an uninterrupted one.
A finished epoch is a directory ``epoch-<k>/`` (renamed into place when complete) holding the
adapter, the optimizer state for epoch k+1 and ``metrics.json``; a rerun returns it untouched.

Logits are computed only at labelled positions ("sparse head"), in chunks whose gradient is taken
in the same pass (`loss.linear_cross_entropy`): on small models most time and memory go to the LM
head over the whole vocabulary, and only those positions count in the loss. Packed rows of plain
causal decoders attend one conversation at a time (`attention.segment_attention`: causal SDPA per
conversation, no mask, about ``sum(len^2)/2`` scores instead of ``T^2``); other models get one float
mask built per batch and shared by every layer (`attention_bias`). Each LoRA linear adds its
low-rank update to the base output in one GEMM (`fuse_lora_updates`), and gated-SiLU MLPs keep two
activations instead of four for the backward pass, their LoRA down projection included (`mlp.fuse_swiglu`).
Not supported: full fine-tuning (``lora=False``), several GPUs.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import torch
import torch.nn.functional as F

from epochwise.config.local import LocalConfig
from epochwise.config.train import HyperParams
from epochwise.io import atomic_dir, atomic_write, atomic_write_bytes
from epochwise.local import keys
from epochwise.local.attention import segments_enabled, segments_of, using_segments
from epochwise.local.data import IGNORE, Batch, micro_batches, pack, read_rows, shuffled, truncate
from epochwise.local.lora import building_peft_model, fuse_lora_updates
from epochwise.local.loss import linear_cross_entropy
from epochwise.local.mlp import fuse_swiglu
from epochwise.local.models import base_model_path, load_base, resolve_device

OPTIMIZER_FILE = "optimizer.pt"
# on_step(step, total_steps, step_loss): called after every optimizer step.
StepCallback = Callable[[int, int, float], None]


@dataclass
class EpochResult:
    """What one local epoch produced; also stored as ``epoch-<k>/metrics.json``."""

    fold: str
    epoch: int
    run_key: str
    adapter_dir: str
    base_model: str
    parent: str | None
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    sample: str | None
    steps: int
    resumed_from_step: int  # 0 for a fresh start
    step_losses: list[float] = field(default_factory=list)
    started_at: str = ""
    threads: int = 0  # torch CPU threads the epoch ran with (a resumed epoch keeps its checkpoint's)
    finished_at: str = ""


def default_threads() -> int:
    """The cores this process may use minus those other work keeps busy (1-minute load average).

    On an idle 2-core machine two threads train ~1.7x faster than one; with other CPU-bound work
    running, OpenMP's spinning barriers made two threads ~8x slower than one (121 vs 924 tokens/s
    measured at load average ~6), so busy cores are left alone.
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def set_threads(local: LocalConfig) -> int:
    """Set torch's thread count (``local.threads``, else `default_threads`) and return it."""
    threads = local.threads or default_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only allowed before the first parallel op
        torch.set_num_interop_threads(1)
    return threads


def lr_lambda(hyper: HyperParams, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then linear or cosine decay to ``min_lr_ratio``."""
    warmup = round(hyper.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if hyper.lr_scheduler == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = 1 - progress
        return hyper.min_lr_ratio + (1 - hyper.min_lr_ratio) * shape

    return factor


def grad_accumulation(hyper: HyperParams, local: LocalConfig) -> int:
    """An integer ``hyper.batch_size`` (sequences per step) sets accumulation; 'max' keeps the local one."""
    if isinstance(hyper.batch_size, int):
        return max(1, hyper.batch_size // local.micro_batch_size)
    return local.grad_accumulation


def attention_bias(position_ids: torch.Tensor, padding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive (0 / -inf) causal attention mask of a batch, ``(batch, 1, T, T)``; None if plain causal.

    The same mask transformers builds: with ``padding`` (1 = token, 0 = pad), padding keys are never
    seen; without it, a packed row starts wherever the position ids do not step by one and tokens
    only see their own row. Given a boolean mask, SDPA converts it to this float form in every layer
    and keeps each copy for the backward pass; one float mask shared by all layers saves
    ``layers - 1`` copies of ``batch x T x T`` floats at the memory peak.
    """
    width = position_ids.shape[1]
    allowed = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    if padding is not None:
        allowed = allowed & padding[:, None, :].bool()
    else:
        starts = position_ids[:, 1:] - position_ids[:, :-1] != 1
        if not starts.any():
            return None  # one sequence per row, no padding: SDPA's is_causal path needs no mask
        row = torch.nn.functional.pad(starts.cumsum(1), (1, 0))
        allowed = allowed & (row[:, :, None] == row[:, None, :])
    bias = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return bias.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


def batch_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the labelled tokens of ``batch`` and their count (sparse head).

    The LM head and cross-entropy run in chunks of positions (`loss.linear_cross_entropy`).
    Plain causal decoders (`attention.segments_enabled`) attend one conversation at a time
    (`attention.segment_attention`); others get the shared float mask of `attention_bias`.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = causal.get_input_embeddings().weight
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if segments_enabled(causal):
        with using_segments(causal):
            hidden = causal.get_decoder()(
                **inputs, segments=segments_of(batch.position_ids, batch.attention_mask)
            ).last_hidden_state
    else:
        mask = attention_bias(batch.position_ids, batch.attention_mask, embeddings.dtype)
        hidden = causal.get_decoder()(**inputs, attention_mask=mask).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    head = causal.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:  # chunked: the full logits never exist at once
        loss = linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep])
    else:
        loss = F.cross_entropy(head(hidden[:, :-1][keep]).float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def accumulate(model, batch: Batch, label_tokens: int) -> float:
    """Forward and backward of one micro batch, its loss scaled by the step's ``label_tokens``; returns
    the batch's summed loss.

    The batch's autograd graph dies when this returns. Kept alive into the next step (as a loop variable
    holding the loss would keep it), its thousands of small nodes sit amid the memory that this step's
    activations freed, so the next step's activations cannot reuse that memory and the heap grows: on
    the tiny model at seq 512, peak RSS was 552 MB with the graph kept and 516 MB without
    (`bench/local_train.py`).
    """
    loss, _ = batch_loss(model, batch)
    (loss / max(1, label_tokens)).backward()
    return loss.item()


@torch.no_grad()
def evaluate(model, blocks, local: LocalConfig, pad_id: int, device: torch.device) -> float | None:
    """Token-weighted mean loss over ``blocks`` (None when there is nothing to score)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in micro_batches(blocks, local.eval_batch_size, pad_id, local.packing):
        loss, n = batch_loss(model, batch.to(device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / count if count else None


@torch.no_grad()
def generate(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int, device: torch.device) -> str:
    """Greedy reply to ``messages`` (the conversation without its final assistant turn)."""
    was_training = model.training
    model.eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    output = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def sample_messages(files: dict[str, Path], local: LocalConfig) -> list[dict[str, str]] | None:
    """The sample prompt: ``local.sample_prompt`` as a user turn, else the first validation conversation."""
    if local.sample_prompt:
        return [{"role": "user", "content": local.sample_prompt}]
    path = files.get("val") or files["train"]
    if path.suffix != ".jsonl":
        return None
    with open(path, "rb") as handle:
        messages = orjson.loads(handle.readline())["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def train_epoch(
    fold: Path | str,
    epoch: int,
    model_name: str,
    hyper: HyperParams,
    local: LocalConfig,
    parent: str | None = None,
    on_step: StepCallback | None = None,
    *,
    key: str | None = None,
) -> EpochResult:
    """Train epoch ``epoch`` of ``fold`` from ``parent`` (an adapter dir; None = fresh LoRA on the base).

    Returns the finished epoch from disk when it exists; resumes from a matching mid-epoch checkpoint.
    ``key`` is the run key (`keys.run_key`) when the caller has computed it already; None computes it.
    """
    if not hyper.lora:
        raise ValueError("the local backend trains LoRA adapters only (set train.hyper.lora=true)")
    fold = Path(fold).resolve()
    key = key or keys.run_key(fold, model_name, hyper, local)
    finished = keys.finished_metrics(fold, key, epoch, parent)
    if finished is not None:
        return EpochResult(**finished)
    started_at = datetime.now(UTC).isoformat()
    run = _setup(fold, epoch, key, model_name, hyper, local, parent)
    state, resumed_from = _restore(run)
    tokens_seen, train_seconds = _run_steps(run, state, on_step)
    return _finish(run, state, resumed_from, tokens_seen / train_seconds if train_seconds else 0.0, started_at)


@dataclass
class _Run:
    """Everything one epoch's steps need, built by `_setup`."""

    fold: Path
    epoch: int
    key: str
    hyper: HyperParams
    local: LocalConfig
    parent: str | None
    device: torch.device
    threads: int
    files: dict[str, Path]
    base_path: str
    model: Any
    tokenizer: Any
    val_rows: list
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: list[Batch]
    accumulation: int
    total_steps: int

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: same run, epoch, parent and step count."""
        return {"run": self.key, "epoch": self.epoch, "parent": self.parent, "steps": self.total_steps}

    @property
    def checkpoint(self) -> Path:
        return keys.checkpoint_path(self.fold, self.key, self.epoch)


def _setup(
    fold: Path, epoch: int, key: str, model_name: str, hyper: HyperParams, local: LocalConfig, parent: str | None
) -> _Run:
    """Threads, device, base model, rows, LoRA model, optimizer, batches and schedule of one epoch."""
    threads = set_threads(local)
    device = resolve_device(local)
    files = keys.fold_files(fold, local.data)
    base_path = base_model_path(model_name, fold, local)
    model, tokenizer = load_base(base_path, device)
    model.config.use_cache = False
    train_rows, val_rows = _read_rows(files, tokenizer, hyper, local)
    model = _lora_model(model, hyper, parent)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, hyper, parent)
    # Data order depends only on the seed and the epoch, so a resumed run sees the same batches.
    blocks = pack(shuffled(train_rows, hyper.seed * 100_003 + epoch), local.seq_length, local.packing)
    accumulation = grad_accumulation(hyper, local)
    batches = list(micro_batches(blocks, local.micro_batch_size, tokenizer.pad_token_id, local.packing))
    total_steps = math.ceil(len(batches) / accumulation)
    if local.max_steps is not None and local.max_steps < total_steps:
        total_steps = local.max_steps
        batches = batches[: total_steps * accumulation]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hyper, total_steps))
    return _Run(
        fold=fold, epoch=epoch, key=key, hyper=hyper, local=local, parent=parent, device=device, threads=threads,
        files=files, base_path=base_path, model=model, tokenizer=tokenizer, val_rows=val_rows, trainable=trainable,
        optimizer=optimizer, scheduler=scheduler, batches=batches, accumulation=accumulation, total_steps=total_steps,
    )  # fmt: skip


def _read_rows(files: dict[str, Path], tokenizer, hyper: HyperParams, local: LocalConfig) -> tuple[list, list]:
    """Train and validation rows, truncated to the sequence length; an error when none can train."""
    train_on_inputs = hyper.train_on_inputs is True
    max_len = min(local.seq_length, hyper.max_seq_length or local.seq_length)
    train_rows = truncate(read_rows(files["train"], tokenizer, train_on_inputs), max_len)
    val_rows = truncate(read_rows(files["val"], tokenizer, train_on_inputs), max_len) if "val" in files else []
    if not train_rows:
        raise ValueError(f"{files['train']}: no row has a labelled token to train on")
    return train_rows, val_rows


def _lora_model(model, hyper: HyperParams, parent: str | None):
    """``parent``'s adapter, trainable, or a fresh seeded LoRA on ``model``; in training mode."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    set_seed(hyper.seed)  # LoRA init of a fresh adapter
    targets = hyper.lora_trainable_modules
    with building_peft_model():
        if parent:
            model = PeftModel.from_pretrained(model, parent, is_trainable=True)
        else:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=hyper.lora_r,
                    lora_alpha=hyper.effective_lora_alpha,
                    lora_dropout=hyper.lora_dropout,
                    target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                    task_type="CAUSAL_LM",
                ),
            )
    fuse_lora_updates(model)
    fuse_swiglu(model)
    model.train()
    return model


def _optimizer(trainable: list[torch.nn.Parameter], hyper: HyperParams, parent: str | None) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters, continuing ``parent``'s optimizer state when it saved one."""
    optimizer = torch.optim.AdamW(trainable, lr=hyper.learning_rate, weight_decay=hyper.weight_decay)
    if parent and (Path(parent) / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(torch.load(Path(parent) / OPTIMIZER_FILE, weights_only=True))
        for group in optimizer.param_groups:  # the saved LR belongs to the parent's schedule
            group["lr"] = group["initial_lr"] = hyper.learning_rate
    return optimizer


def _restore(run: _Run) -> tuple[dict[str, Any], int]:
    """Seed this epoch's dropout stream, then continue a matching checkpoint: (state, step resumed from)."""
    state: dict[str, Any] = {"step": 0, "loss_sum": 0.0, "label_tokens": 0, "step_losses": []}
    torch.manual_seed(run.hyper.seed + run.epoch)  # dropout stream of this epoch
    if not run.checkpoint.is_file():
        return state, 0
    saved = torch.load(run.checkpoint, weights_only=False)  # our own file, written by _save_checkpoint
    if saved["identity"] != run.identity:
        return state, 0
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved["trainable"].items():
            params[name].copy_(tensor)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    state = saved["state"]
    _set_rng(saved["rng"])
    if run.local.threads is None and saved.get("threads", run.threads) != run.threads:
        # The thread count changes float reduction order: keep the killed run's, so the
        # resumed loss curve matches an uninterrupted one exactly.
        run.threads = saved["threads"]
        torch.set_num_threads(run.threads)
    return state, state["step"]


def _run_steps(run: _Run, state: dict[str, Any], on_step: StepCallback | None) -> tuple[int, float]:
    """The optimizer steps from ``state["step"]`` to the end, checkpointing as configured.

    Updates ``state`` in place; returns the tokens trained on and the seconds the steps took.
    """
    hyper, local, accumulation = run.hyper, run.local, run.accumulation
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    tokens_seen, train_seconds = 0, 0.0
    for step in range(state["step"], run.total_steps):
        t0 = time.perf_counter()
        group = [b.to(run.device) for b in run.batches[step * accumulation : (step + 1) * accumulation]]
        label_tokens = sum(b.label_tokens for b in group)
        step_loss = sum(accumulate(run.model, batch, label_tokens) for batch in group)
        if hyper.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.trainable, hyper.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        tokens_seen += sum(b.tokens for b in group)
        state["step"] = step + 1
        state["loss_sum"] += step_loss
        state["label_tokens"] += label_tokens
        state["step_losses"].append(step_loss / max(1, label_tokens))
        if on_step is not None:
            on_step(step + 1, run.total_steps, state["step_losses"][-1])
        if state["step"] % local.checkpoint_every == 0 and state["step"] < run.total_steps:
            _save_checkpoint(
                run.checkpoint, run.identity, names, run.model, run.optimizer, run.scheduler, state, run.threads
            )
    return tokens_seen, train_seconds


def _finish(run: _Run, state: dict[str, Any], resumed_from: int, tokens_per_s: float, started_at: str) -> EpochResult:
    """Validation loss and sample, then the epoch directory written and the checkpoint dropped."""
    local, pad_id = run.local, run.tokenizer.pad_token_id
    val_blocks = pack(run.val_rows, local.seq_length, local.packing)
    val_loss = evaluate(run.model, val_blocks, local, pad_id, run.device) if val_blocks else None
    messages = sample_messages(run.files, local) if local.sample_max_new_tokens else None
    sample = generate(run.model, run.tokenizer, messages, local.sample_max_new_tokens, run.device) if messages else None
    out_dir = keys.epoch_dir(run.fold, run.key, run.epoch)
    result = EpochResult(
        fold=run.fold.name,
        epoch=run.epoch,
        run_key=run.key,
        adapter_dir=str(out_dir),
        base_model=run.base_path,
        parent=run.parent,
        train_loss=state["loss_sum"] / max(1, state["label_tokens"]),
        val_loss=val_loss,
        tokens_per_s=tokens_per_s,
        sample=sample,
        steps=run.total_steps,
        resumed_from_step=resumed_from,
        step_losses=state["step_losses"],
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(),
        threads=run.threads,
    )
    _save_epoch(out_dir, run.model, run.optimizer, result)
    run.checkpoint.unlink(missing_ok=True)
    return result


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    path: Path, identity: dict, names: list[str], model, optimizer, scheduler, state: dict, threads: int
) -> None:
    """Everything needed to continue at the next step, written atomically (a kill leaves the old one)."""
    params = dict(model.named_parameters())
    payload = {
        "identity": identity,
        "threads": threads,
        "trainable": {n: params[n].detach().cpu().clone() for n in names},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "rng": _rng_state(),
    }
    with atomic_write(path) as handle:
        torch.save(payload, handle)


def _save_epoch(out_dir: Path, model, optimizer, result: EpochResult) -> None:
    """Adapter + optimizer state + metrics into a temporary sibling, renamed to ``epoch-<k>`` at the end."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        atomic_write_bytes(tmp / keys.METRICS_FILE, orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2))

    atomic_dir(out_dir, write, replace=True)  # an older epoch from another parent: replaced by this one
