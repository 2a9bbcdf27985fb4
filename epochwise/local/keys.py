"""Content keys and directory layout of local runs (no torch here: the flows import this module).

A *run key* names ``<fold>/local/<run key>/``: it hashes the fold's files, the model, the shared
hyper-parameters and the training-relevant local settings, so runs with different data or settings
never share a directory. A model directory counts by its resolved path and its files' names, sizes
and modification times (hashing gigabytes of weights on every run would cost more than it saves), so
replacing the weights in place trains anew instead of reusing adapters made for the old ones.
Epochs of one chain live side by side in it:

    <fold>/local/<run key>/epoch-<k>/      adapter (peft save_pretrained) + optimizer state + metrics.json
    <fold>/local/<run key>/checkpoint-epoch-<k>.pt   mid-epoch checkpoint, deleted once epoch k is done
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from epochwise.config.local import LocalConfig
from epochwise.config.train import HyperParams
from epochwise.fold import HARMONY_DIR, METHOD_FILES, TRAIN_FILE, TRAIN_PARQUET, VAL_FILE, VAL_PARQUET
from epochwise.io import sha256_file

# Bump when the trainer changes what it produces for the same inputs (tokenisation, loss, packing).
TRAINER_VERSION = "1"
METRICS_FILE = "metrics.json"
# Files per LocalConfig.data: ChatML written by `epochwise prepare`, or the Harmony parquet written by
# `epochwise convert --format harmony` (already tokenised and labelled; gpt-oss vocabulary).
DATA_FILES = {
    "chatml": {"train": TRAIN_FILE, "val": VAL_FILE},
    "harmony": {"train": f"{HARMONY_DIR}/{TRAIN_PARQUET}", "val": f"{HARMONY_DIR}/{VAL_PARQUET}"},
}


def fold_files(fold: Path | str, data: str = "chatml", method: str = "sft") -> dict[str, Path]:
    """The training files of a fold (``train`` and, when present, ``val``) for ``method``: DPO and GRPO
    read their own files (`epochwise.fold.METHOD_FILES`, as `Fold.files` does) when the fold has them, else
    ``train.jsonl`` / ``val.jsonl``."""
    fold = Path(fold)
    if method != "sft" and (fold / METHOD_FILES[method][0]).is_file():
        named = zip(("train", "val"), METHOD_FILES[method], strict=True)
        return {split: fold / name for split, name in named if (fold / name).is_file()}
    found = {split: fold / name for split, name in DATA_FILES[data].items() if (fold / name).is_file()}
    if "train" not in found:
        hint = "epochwise prepare" if data == "chatml" else "epochwise convert --format harmony"
        raise FileNotFoundError(f"{fold / DATA_FILES[data]['train']}: not found (run `{hint}` first)")
    return found


def fold_hashes(fold: Path | str, data: str = "chatml", method: str = "sft") -> dict[str, str]:
    """``{"train": sha256, ...}`` of the files the trainer reads."""
    return {split: sha256_file(path) for split, path in fold_files(fold, data, method).items()}


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# Model names the trainer builds itself (epochwise.local.models); anything else is a path or an HF id.
BUILT_MODELS = ("tiny", "smollm2")
HUB_PROBE_TIMEOUT_S = 3  # one TCP connect to the hub before trusting a name that may be a hub id


def local_model_dir(model: str) -> Path | None:
    """The resolved directory of a local ``--model`` path; None for a built model or an HF hub id.

    A name that can only be a path (``/...``, ``./...``, ``../...``, ``~...``) must exist: otherwise
    transformers would take it for a hub id and fail only after a minute of retries.
    """
    if model in BUILT_MODELS:
        return None
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    if model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{model}: no such model directory (a hub id looks like 'org/name')")
    return None


def check_model(model: str) -> None:
    """Fail at once, with the closest built-in name, on a ``--model`` that cannot be loaded.

    Accepted: a built-in (``tiny``, ``smollm2``), an existing path, a model already in the Hugging Face
    cache, or an id the hub knows. Without this, transformers takes an unknown name for a hub id and
    fails only after a minute and a half of download retries (or at once, but with a traceback, when
    ``HF_HUB_OFFLINE`` is set). Raises `FileNotFoundError` with the reason.
    """
    if model in BUILT_MODELS or local_model_dir(model) is not None:
        return
    import huggingface_hub
    from huggingface_hub import constants

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
            return
    except ValueError:  # not even a valid hub id ("a b", "x//y"), so not cached either
        pass
    what = f"--model {model}: not a built-in ({', '.join(BUILT_MODELS)}), a model directory or a cached hub model"
    close = difflib.get_close_matches(model.lower(), BUILT_MODELS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(f"{what}, and the hub is off (HF_HUB_OFFLINE){hint}")
    endpoint = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        raise FileNotFoundError(f"{what}, and the hub ({constants.ENDPOINT}) cannot be reached{hint}") from None
    try:
        known = huggingface_hub.repo_exists(model)
    except ValueError:
        known = False
    except Exception:  # the hub answered oddly (proxy, outage): let transformers report it when loading
        return
    if not known:
        raise FileNotFoundError(f"{what}, and the hub has no such model (a private one needs HF_TOKEN){hint}")


def model_identity(model: str) -> str | dict[str, Any]:
    """What identifies ``model`` in a run key: its name, or for a directory its path and files' stats."""
    directory = local_model_dir(model)
    if directory is None:
        return model
    files = [directory] if directory.is_file() else sorted(directory.iterdir())
    stats = [(p.name, p.stat()) for p in files if p.is_file() and not p.name.startswith(".")]
    return {"path": str(directory), "files": [(name, st.st_size, st.st_mtime_ns) for name, st in stats]}


def run_key(
    fold: Path | str, model: str, hyper: HyperParams, local: LocalConfig, method: dict[str, Any] | None = None
) -> str:
    """16 hex digits naming the run directory; equal only for equal data, model and recipe.

    ``method`` is `TrainConfig.method_fields`: empty for SFT, so SFT run keys are what they always were.
    """
    payload: dict[str, Any] = {
        "trainer": TRAINER_VERSION,
        "data": fold_hashes(fold, local.data, str((method or {}).get("method", "sft"))),
        "model": model_identity(model),
        "hyper": hyper.model_dump(mode="json"),
        "local": local.training_fields(),
    }
    if method:
        payload["method"] = method
    return _digest(payload)[:16]


def run_dir(fold: Path | str, key: str) -> Path:
    return Path(fold).resolve() / "local" / key


def epoch_dir(fold: Path | str, key: str, epoch: int) -> Path:
    return run_dir(fold, key) / f"epoch-{epoch}"


def checkpoint_path(fold: Path | str, key: str, epoch: int) -> Path:
    return run_dir(fold, key) / f"checkpoint-epoch-{epoch}.pt"


def finished_metrics(fold: Path | str, key: str, epoch: int, parent: str | None) -> dict[str, Any] | None:
    """``metrics.json`` of epoch ``epoch`` when it finished on disk from the same ``parent``, else None."""
    path = epoch_dir(fold, key, epoch) / METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_bytes())
    return metrics if metrics.get("parent") == parent else None


def epoch_cache_key(
    fold: Path | str, epoch: int, model: str, hyper: HyperParams, local: LocalConfig, parent: str | None
) -> str | None:
    """Prefect cache key of one local epoch, or None (no caching) while the epoch is not finished on disk.

    The key hashes the run key (fold content, model, recipe), the epoch, the parent and the finished
    epoch's ``metrics.json``. Keying on the finished files means a cached result never points at an
    adapter that was deleted or retrained since: then the key changes and the task looks at the disk
    again (an epoch found finished there is returned without training).
    """
    return run_epoch_cache_key(fold, run_key(fold, model, hyper, local), epoch, parent)


def run_epoch_cache_key(fold: Path | str, key: str, epoch: int, parent: str | None) -> str | None:
    """`epoch_cache_key` from a run key already computed (``key``), so the fold is not hashed again."""
    metrics = epoch_dir(fold, key, epoch) / METRICS_FILE
    if finished_metrics(fold, key, epoch, parent) is None:
        return None
    payload = {"run": key, "epoch": epoch, "parent": parent, "finished": sha256_file(metrics)}
    return f"local-epoch-{_digest(payload)[:32]}"
