"""The dry run behind ``epochwise plan``: per-epoch tokens and price of a fold before anything is paid.

Pure arithmetic over token counts, plus the counters that produce them:

* gpt-oss (Harmony parquet): the o200k tokens the converter wrote. Together does not pack parquet
  rows, and with packing off it bills ``rows x max_seq_length`` tokens per pass (Together's fine-tuning
  pricing page), so the plan shows billed and real tokens and the difference as padding waste.
* local backend: the local model's own tokenizer (``tiny``: trained on the fold; ``smollm2``: the one
  it ships), the rows as the trainer cuts them.
* any other Together model: JSONL is tokenized by Together with the model's tokenizer, which is not
  available offline: ``bytes / 4``, labelled as an estimate.

Price per epoch: Together's ``estimate-price`` when both fold files are already uploaded (found by
content in Together's file list, nothing uploaded), else tokens x a per-million-token rate by model size
(Together's published LoRA/full SFT rates; labelled as an estimate). Together bills a job
``n_epochs x train tokens + n_evals x validation tokens``; each epoch here is its own 1-epoch job.

DPO (``train.method: dpo``): the fold's preference files (`epochwise.fold.Fold.files`), always JSONL.
Together prices DPO per token apart from SFT (https://docs.together.ai/docs/fine-tuning/pricing: the
rate depends on the model size, the training method, SFT or DPO, and LoRA or full). Together's
``estimate-price`` is asked with ``training_method={"method": "dpo", ...}``, as the SDK's own create
asks it; offline, the SFT rate x `DPO_RATE_FACTOR`, labelled as an estimate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ESTIMATE_BYTES_PER_TOKEN = 4
DEFAULT_MAX_SEQ_LENGTH = 8192  # Together's SFT limit for most models when no --max-seq-length is given

# USD per million tokens, supervised fine-tuning, by model size bracket (billions of parameters, upper
# bound inclusive): (LoRA, full), as copied from https://together.ai/pricing (not re-checked since;
# rates change), so plans built from this table say "estimate" and the flow asks Together's own
# estimate-price before every paid epoch.
SFT_RATES_PER_MTOK: tuple[tuple[float, float, float], ...] = (
    (16.0, 0.48, 0.54),
    (69.0, 1.50, 1.65),
    (100.0, 2.90, 3.20),
)


@dataclass(frozen=True)
class FileCount:
    """One fold file as it will be trained: rows, real tokens, tokens billed per pass."""

    role: str  # "train" | "val"
    path: str
    sha256: str
    bytes: int
    rows: int
    tokens: int  # real (non-padding) tokens, by the tokenizer named in the plan
    billed_tokens: int  # what one pass is billed (parquet: rows x max_seq_length)
    file_id: str | None = None  # the same bytes already uploaded to Together (found by content)

    @property
    def padding_waste(self) -> int:
        return self.billed_tokens - self.tokens


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's tokens and price, and the running total of the chain so far."""

    epoch: int
    train_tokens: int
    val_tokens: int
    price_usd: float | None
    total_usd: float | None
    within_budget: bool


@dataclass(frozen=True)
class Plan:
    """What ``epochwise train`` with the same flags would train and roughly pay, epoch by epoch."""

    fold: str
    backend: str
    model: str
    tokenizer: str  # which tokenizer produced the counts ("estimate" when none)
    price_source: str  # where the prices come from
    budget_usd: float | None
    files: list[FileCount]
    epochs: list[EpochPlan] = field(default_factory=list)
    kept: int = 0  # epochs 1..kept are recorded with another method; the run continues after them
    refused: list[str] = field(default_factory=list)  # settings the model's Together limits refuse

    @property
    def stops_before(self) -> int | None:
        """The first epoch the budget stops the chain before (None: every epoch fits)."""
        return next((e.epoch for e in self.epochs if not e.within_budget), None)

    def epoch_rows(self) -> list[dict[str, object]]:
        budget = "" if self.budget_usd is None else f"{self.budget_usd:.2f}"
        return [
            {
                "epoch": e.epoch,
                "train tokens": e.train_tokens,
                "val tokens": e.val_tokens,
                "price $": _usd(e.price_usd),
                "total $": _usd(e.total_usd),
                "budget $": budget,
                "fits": "yes" if e.within_budget else "no: stops here",
            }
            for e in self.epochs
        ]

    def file_rows(self) -> list[dict[str, object]]:
        return [
            {
                "file": Path(f.path).name,
                "rows": f.rows,
                "tokens": f.tokens,
                "billed tokens": f.billed_tokens,
                "padding waste": f.padding_waste,
                "uploaded": f.file_id or "no",
            }
            for f in self.files
        ]

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.fold}: plan for {len(self.epochs)} epoch(s), backend {self.backend}, model {self.model}",
            f"tokens: {self.tokenizer}",
            f"price: {self.price_source}",
        ]
        if self.kept:
            lines.append(f"epochs 1-{self.kept} are recorded with another method; this run continues after them")
        uploaded = [f"{Path(f.path).name} {f.file_id}" for f in self.files if f.file_id]
        if uploaded:
            lines.append("already uploaded (found by content, reused): " + ", ".join(uploaded))
        waste = sum(f.padding_waste for f in self.files)
        if waste:
            billed = sum(f.billed_tokens for f in self.files)
            lines.append(
                f"padding waste: {waste} of {billed} billed tokens per pass ({100 * waste / billed:.0f}%) are padding"
            )
        total = self.epochs[-1].total_usd if self.epochs else None
        if total is not None:
            lines.append(f"total for {len(self.epochs) + self.kept} epoch(s): ${total:.2f}")
        stop = self.stops_before
        if stop is not None:
            lines.append(f"the ${self.budget_usd:.2f} budget stops the chain before epoch {stop}")
        return lines


def _usd(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def plan_epochs(
    epochs: int,
    train_tokens: int,
    val_tokens: int,
    n_evals: int,
    price_per_epoch: float | None,
    budget_usd: float | None,
    kept: int = 0,
    kept_usd: float = 0.0,
) -> list[EpochPlan]:
    """Per-epoch rows: each epoch trains ``train_tokens`` once and evaluates ``n_evals`` times.

    The budget rule is the flow's: an epoch runs only when the spend so far plus its price fits.
    ``kept``: epochs 1..kept are already trained with another method (a switched chain, see
    `epochwise.epochs.chain_before`), costing ``kept_usd``: the rows start after them, the spend with them.
    """
    rows, total, fits = [], kept_usd, True
    for epoch in range(kept + 1, epochs + 1):
        if price_per_epoch is not None:
            total += price_per_epoch
            fits = fits and (budget_usd is None or total <= budget_usd + 1e-9)
        rows.append(
            EpochPlan(
                epoch=epoch,
                train_tokens=train_tokens,
                val_tokens=val_tokens * n_evals,
                price_usd=price_per_epoch,
                total_usd=None if price_per_epoch is None else round(total, 6),
                within_budget=fits,
            )
        )
    return rows


def model_size_b(model: str) -> float | None:
    """Parameters in billions from a model name (``openai/gpt-oss-20b`` -> 20, ``Llama-3.1-8B`` -> 8)."""
    sizes = [float(m) for m in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", model)]
    return max(sizes) if sizes else None


# DPO's rate as a multiple of the SFT rate of the same model size and training type: an estimate (the
# DPO column of https://together.ai/pricing as remembered, 2.5x SFT, not re-checked against the page),
# so DPO plans built from it say so; Together's estimate-price is asked before every paid DPO epoch.
DPO_RATE_FACTOR = 2.5


def rate_per_mtok(model: str, lora: bool) -> float | None:
    """Together's published SFT rate in USD per million tokens for ``model``'s size; None when unknown."""
    size = model_size_b(model)
    if size is None:
        return None
    for upper, lora_rate, full_rate in SFT_RATES_PER_MTOK:
        if size <= upper:
            return lora_rate if lora else full_rate
    return None


def price_from_rate(train_tokens: int, val_tokens: int, n_evals: int, rate: float | None) -> float | None:
    """One 1-epoch job: ``(train + n_evals x val) tokens x rate / 1e6``."""
    if rate is None:
        return None
    return (train_tokens + n_evals * val_tokens) * rate / 1e6


# --- token counters -------------------------------------------------------------------------------


def count_estimate(role: str, path: Path | str, sha256: str) -> FileCount:
    """JSONL without an offline tokenizer: ``bytes / 4`` tokens (an estimate), one row per line."""
    path = Path(path)
    data = path.read_bytes()
    rows = sum(1 for line in data.splitlines() if line.strip())
    tokens = len(data) // ESTIMATE_BYTES_PER_TOKEN
    return FileCount(role, str(path), sha256, len(data), rows, tokens, tokens)


def count_parquet(role: str, path: Path | str, sha256: str, max_seq_length: int) -> FileCount:
    """Pre-tokenized parquet: real tokens = attention mask ones; billed = rows x ``max_seq_length``."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    mask = pq.read_table(path, columns=["attention_mask"]).column("attention_mask").combine_chunks()
    rows = len(mask)
    if rows:
        ones = np.bincount(
            pc.list_parent_indices(mask).to_numpy(), weights=pc.list_flatten(mask).to_numpy(), minlength=rows
        )
        real = int(np.minimum(ones, max_seq_length).sum())  # Together cuts a longer row at max_seq_length
    else:
        real = 0
    billed = rows * max_seq_length
    return FileCount(role, str(path), sha256, path.stat().st_size, rows, real, billed)


def count_tokenized(role: str, path: Path | str, sha256: str, lengths: Iterable[int], max_len: int) -> FileCount:
    """Rows tokenized by the model's own tokenizer (``lengths``), each cut at ``max_len`` like the trainer."""
    path = Path(path)
    cut = [min(n, max_len) for n in lengths]
    tokens = sum(cut)
    return FileCount(role, str(path), sha256, path.stat().st_size, len(cut), tokens, tokens)



# --- building a plan ------------------------------------------------------------------------------


def build_plan(
    fold: Path | str, backend: str, train, local, harmony, client=None, kept=(), post_training=None
) -> Plan:
    """The plan of ``epochwise train`` for ``fold`` with these settings (``TrainConfig``, ``LocalConfig``,
    ``HarmonyConfig``). ``client`` (a ``together.Together``) is only read from: the file list, the model's
    limits and, for files already uploaded, ``estimate-price``; None plans offline. ``kept``: the
    recorded epochs of another method that the run continues (`epochwise.epochs.chain_before`). GRPO on
    Together is priced by the model resource's ``estimate-cost`` (``post_training``: ``PostTrainingConfig``)."""
    if backend == "local":
        return _local_plan(Path(fold), train, local)
    if getattr(train, "method", "sft") == "grpo":
        return _grpo_plan(Path(fold), train, client, post_training)
    return _together_plan(Path(fold), train, harmony, client, list(kept))


def _grpo_plan(fold: Path, train, client, post_training) -> Plan:
    """GRPO on Together's post-training API: the resource's price per hour (Together's ``estimate-cost``)
    x ``post_training.hours_per_epoch`` per epoch, the rule the flow applies before provisioning."""
    from epochwise.config.together import PostTrainingConfig
    from epochwise.fold import Fold
    from epochwise.io import sha256_file

    cfg = post_training or PostTrainingConfig()
    paths = {role: p for role, p in zip(("train", "val"), Fold.of(fold).files("grpo"), strict=True) if p.is_file()}
    files = [count_estimate(role, p, sha256_file(p)) for role, p in paths.items()]
    price, source = None, "unknown without a Together key (Together's estimate-cost prices the model resource)"
    if client is not None:
        from epochwise import post_training as pt

        hourly = pt.price_per_hour(client, pt.ResourceSpec.of(train.base_model, cfg, train.hyper.lora))
        price = hourly * cfg.hours_per_epoch
        source = (f"Together's estimate-cost of the model resource, ${hourly:.2f}/hour x "
                  f"post_training.hours_per_epoch={cfg.hours_per_epoch:g} h per epoch (billed while READY)")
    by_role = {f.role: f for f in files}
    train_tokens = by_role["train"].tokens if "train" in by_role else 0
    val_tokens = by_role["val"].tokens if "val" in by_role else 0
    return Plan(
        fold=fold.name, backend="together", model=train.base_model,
        tokenizer=f"estimate, bytes/{ESTIMATE_BYTES_PER_TOKEN} of the prompt rows (GRPO samples the completions)",
        price_source=source, budget_usd=train.budget_usd, files=files,
        epochs=plan_epochs(train.epochs, train_tokens, val_tokens, 1, price, train.budget_usd),
    )


def _together_plan(fold: Path, train, harmony, client, kept=None) -> Plan:
    from epochwise import together_api as api
    from epochwise.fold import TRAIN_FILE, VAL_FILE
    from epochwise.io import sha256_file

    hyper = train.hyper
    dpo = train.method == "dpo"
    limits = client.fine_tuning.model_limits(model_name=train.base_model) if client is not None else None
    if "gpt-oss" in train.base_model and not dpo:  # DPO uploads preference JSONL for every model
        from epochwise.harmony import convert_fold, harmony_paths

        convert_fold(fold, harmony)  # local parquet only (reused while its manifest matches)
        paths = {role: p for role, p in harmony_paths(fold).items() if role != "manifest" and p.is_file()}
        max_seq = hyper.max_seq_length or _limit_seq_length(limits) or harmony.max_seq_length
        files = [count_parquet(role, p, sha256_file(p), max_seq) for role, p in paths.items()]
        tokenizer = (
            "o200k_base via openai-harmony, the tokens Together trains on; parquet is not packed, so each "
            f"row is billed as max_seq_length={max_seq} tokens"
        )
    else:
        from epochwise.fold import Fold

        names = (TRAIN_FILE, VAL_FILE) if not dpo else tuple(p.name for p in Fold.of(fold).files("dpo"))
        paths = {role: fold / name for role, name in zip(("train", "val"), names, strict=True) if (fold / name).is_file()}
        files = [count_estimate(role, p, sha256_file(p)) for role, p in paths.items()]
        tokenizer = (
            f"estimate, bytes/{ESTIMATE_BYTES_PER_TOKEN} (Together tokenizes JSONL with {train.base_model}'s "
            "tokenizer, which is not available offline)"
        )
    if client is not None:
        files = [
            FileCount(
                **{
                    **f.__dict__,
                    "file_id": getattr(api.find_uploaded(client, f.sha256, f.bytes, "fine-tune"), "id", None),
                }
            )
            for f in files
        ]
    by_role = {f.role: f for f in files}
    train_file, val_file = by_role["train"], by_role.get("val")
    n_evals = max(hyper.n_evals, 1) if val_file is not None else 0
    val_billed = val_file.billed_tokens if val_file is not None else 0
    price, source = None, ""
    if client is not None and train_file.file_id and (val_file is None or val_file.file_id):
        request = api.EpochRequest(
            training_file=train_file.file_id,
            validation_file=val_file.file_id if val_file is not None else None,
            base_model=train.base_model,
            parent_job=None,
            suffix="plan",
            hyper=hyper,
            dpo=train.dpo if dpo else None,
        )
        price = api.estimate_price(client, request)
        if price is not None:
            kind = "DPO " if dpo else ""
            source = f"Together's {kind}estimate-price, per epoch, for the fold files already uploaded"
    if price is None:
        rate = rate_per_mtok(train.base_model, hyper.lora)
        if rate is not None and dpo:
            rate *= DPO_RATE_FACTOR
        price = price_from_rate(train_file.billed_tokens, val_billed, n_evals, rate)
        method = "LoRA" if hyper.lora else "full"
        if price is None:
            source = f"unknown: no published rate for {train.base_model!r} (Together prices it before each epoch)"
        elif dpo:
            source = (
                f"estimate: (train + {n_evals} x val) billed tokens x ${rate:.2f} per 1M tokens (Together's "
                f"published {method} SFT rate for a {model_size_b(train.base_model):g}B model x {DPO_RATE_FACTOR:g}, "
                "an estimate of its DPO rate); Together's own DPO estimate needs the files uploaded"
            )
        else:
            source = (
                f"estimate: (train + {n_evals} x val) billed tokens x ${rate:.2f} per 1M tokens (Together's "
                f"published {method} SFT rate for a {model_size_b(train.base_model):g}B model); "
                "Together's own estimate needs the files uploaded"
            )
    return Plan(
        fold=fold.name,
        backend="together",
        model=train.base_model,
        tokenizer=tokenizer,
        price_source=source,
        budget_usd=train.budget_usd,
        files=files,
        epochs=plan_epochs(
            train.epochs,
            train_file.billed_tokens,
            val_billed,
            n_evals,
            price,
            train.budget_usd,
            len(kept or []),
            sum(r.price_usd or 0.0 for r in kept or []),
        ),
        kept=len(kept or []),
        refused=api.limit_problems(limits, hyper, val_file is not None) if limits is not None else [],
    )


def _limit_seq_length(limits) -> int | None:
    """``max_seq_length_sft`` of a model's limits (``fine_tuning.model_limits``), None offline."""
    if limits is None:
        return None
    value = getattr(limits, "max_seq_length_sft", None) or (limits.model_extra or {}).get("max_seq_length_sft")
    return int(value) if value else None


def _local_plan(fold: Path, train, local) -> Plan:
    from transformers import AutoTokenizer

    from epochwise.io import sha256_file
    from epochwise.local.data import read_rows
    from epochwise.local.keys import fold_files
    from epochwise.local.models import CHATML_TEMPLATE, base_model_path

    hyper = train.hyper
    path = base_model_path(train.local_model, fold, local)  # tiny: built (and cached) from the fold
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    max_len = min(local.seq_length, hyper.max_seq_length or local.seq_length)
    files = [
        count_tokenized(
            role,
            p,
            sha256_file(p),
            (len(r.input_ids) for r in read_rows(p, tokenizer, hyper.train_on_inputs is True)),
            max_len,
        )
        for role, p in fold_files(fold, local.data).items()
    ]
    by_role = {f.role: f for f in files}
    val = by_role.get("val")
    label = {"tiny": "the tiny model's byte-level BPE, trained on this fold", "smollm2": "SmolLM2's own tokenizer"}
    return Plan(
        fold=fold.name,
        backend="local",
        model=train.local_model,
        tokenizer=label.get(train.local_model, f"{train.local_model}'s own tokenizer") + f", rows cut at {max_len}",
        price_source="local training: no charge",
        budget_usd=None,
        files=files,
        epochs=plan_epochs(train.epochs, by_role["train"].tokens, val.tokens if val else 0, 1 if val else 0, 0.0, None),
    )
