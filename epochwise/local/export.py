"""Use a finished local epoch: find it, export it (merged model or adapter), generate from it.

Epochs are found on disk from their ``metrics.json`` (``<fold>/local/<run key>/epoch-<k>/``), so these
commands need neither Prefect nor the run's settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson

from epochwise.epochs import EpochChoiceError, EpochRecord, choose_epoch
from epochwise.local.keys import METRICS_FILE


def find_epochs(fold: Path | str, run: str | None = None) -> list[dict]:
    """Metrics of every finished epoch of one run of ``fold`` (default: the most recently trained run)."""
    root = Path(fold) / "local"
    found = sorted(root.glob(f"{run or '*'}/epoch-*/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{root}: no finished local epoch" + (f" for run {run}" if run else ""))
    latest_run = found[-1].parent.parent
    return [orjson.loads(p.read_bytes()) for p in found if p.parent.parent == latest_run]


def pick_epoch(fold: Path | str, epoch: str, run: str | None = None) -> dict:
    """``epoch`` is a number or ``best`` (`epochwise.epochs.choose_epoch`) among the finished epochs on disk."""
    epochs = find_epochs(fold, run)
    records = [EpochRecord(fold=m["fold"], epoch=m["epoch"], backend="local", val_loss=m["val_loss"]) for m in epochs]
    try:
        chosen = choose_epoch(records, epoch)
    except EpochChoiceError as exc:
        if exc.missing is None:
            raise
        done = ", ".join(map(str, exc.known))
        raise FileNotFoundError(f"{fold}: epoch {exc.missing} is not finished (finished: {done})") from None
    return next(m for m in epochs if m["epoch"] == chosen.epoch)


def load_epoch(metrics: dict):
    """The base model with the epoch's adapter, in eval mode, and its tokenizer."""
    import torch
    from peft import PeftModel

    from epochwise.local.lora import building_peft_model
    from epochwise.local.models import load_base

    model, tokenizer = load_base(metrics["base_model"], torch.device("cpu"))
    with building_peft_model():
        model = PeftModel.from_pretrained(model, metrics["adapter_dir"])
    model.eval()
    return model, tokenizer


def export_epoch(metrics: dict, out: Path | str, merged: bool = True) -> Path:
    """Write the merged model (base + adapter, loadable without peft) or the adapter alone, plus the tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_epoch(metrics)
    if merged:
        model.merge_and_unload().save_pretrained(out)
    else:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(Path(metrics["adapter_dir"]) / name, out / name)
    tokenizer.save_pretrained(out)
    return out


def sample_epoch(metrics: dict, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy reply of the epoch's model to one user message."""
    import torch

    from epochwise.local.trainer import generate

    model, tokenizer = load_epoch(metrics)
    return generate(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens, torch.device("cpu"))
