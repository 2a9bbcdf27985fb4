"""Local trainer vs HF ``Trainer`` + peft: training tokens/s and peak RSS, side by side, in one run.

Both variants train one epoch of the same base model (default ``tiny``) with the same LoRA settings,
the same packed blocks, sequence length, micro batch, accumulation and torch threads, then compute
the validation loss once (what one epoch of epoch-train does). Each runs in its own subprocess so its
peak RSS (``ru_maxrss``) is its own. Tokens/s counts real (non-padding) tokens over the training
loop's wall time only (no model build, no evaluation). On a shared machine wall time swings with
other work, so each variant also reports tokens per CPU-second of its process over optimizer steps
2..N (same steps, same tokens for both; the first step's one-off allocations excluded).

Model FLOPs utilisation (MFU): the FLOPs a LoRA step needs per token (frozen linears forward + input
gradient 4N, LoRA adapters forward + both gradients, the LM head only at labelled positions,
causal attention over each conversation only), times tokens per CPU-second, over the fp32 GEMM
peak of this machine per CPU-second (``torch.matmul`` of 2048x2048 matrices, same thread count, best
of several, measured in this run before each pair).
Targets: >= 1.25x tokens/s and <= 0.8x peak RSS for the local trainer.
The two train losses are not the same statistic: the loop's is the mean over every labelled token it
trained on, the Trainer's ``training_loss`` the mean of its per-step losses, so they differ a little when
steps hold different numbers of labelled tokens.

    .venv/bin/python bench/local_train.py --repeats 5 --threads 1          # example fold, tiny model
    .venv/bin/python bench/local_train.py --model smollm2 --seq-length 256 --max-steps 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_fold(target: Path) -> Path:
    """The README's example fold, prepared with the example records' own mapping and the project's split."""
    from epochwise.config import load_settings
    from epochwise.prepare import prepare
    from epochwise.records import read_records

    prepare(
        read_records(REPO / "examples" / "records" / "games").records,
        target,
        load_settings(REPO / "epochwise.yaml", records_file=REPO / "examples/records/games/epochwise.yaml").data,
    )
    return target


def configs(args: argparse.Namespace):
    from epochwise.config.local import LocalConfig
    from epochwise.config.train import HyperParams

    local = LocalConfig(
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch,
        threads=args.threads,
        cache_dir=Path(args.work) / "models",
        sample_max_new_tokens=0,
        max_steps=args.max_steps,
    )
    return HyperParams(), local


def run_loop(args: argparse.Namespace) -> dict:
    """epochwise's own loop: one fresh epoch through `train_epoch`."""
    from epochwise.local.trainer import train_epoch

    hyper, local = configs(args)
    shutil.rmtree(Path(args.fold) / "local", ignore_errors=True)
    marks: list[float] = []
    result = train_epoch(args.fold, 1, args.model, hyper, local, None, lambda *_: marks.append(time.process_time()))
    return {
        "tokens_per_s": result.tokens_per_s,
        "cpu_s": marks[-1] - marks[0],
        "steps": result.steps,
        "train_loss": result.train_loss,
    }


def run_trainer(args: argparse.Namespace) -> dict:
    """HF Trainer + peft on the same blocks, LoRA config, batch and threads."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from epochwise.local.data import collate, pack, read_rows, shuffled, truncate
    from epochwise.local.keys import fold_files
    from epochwise.local.models import base_model_path, load_base
    from epochwise.local.trainer import set_threads

    hyper, local = configs(args)
    set_threads(local)
    model, tokenizer = load_base(base_model_path(args.model, args.fold, local), torch.device("cpu"))
    model.config.use_cache = False
    files = fold_files(args.fold)
    rows = truncate(read_rows(files["train"], tokenizer), local.seq_length)
    blocks = pack(shuffled(rows, hyper.seed * 100_003 + 1), local.seq_length, local.packing)
    val_blocks = pack(truncate(read_rows(files["val"], tokenizer), local.seq_length), local.seq_length, local.packing)
    set_seed(hyper.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=hyper.lora_r,
            lora_alpha=hyper.effective_lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    tokens = sum(len(r.input_ids) for block in blocks for r in block)

    def collator(batch_blocks):
        batch = collate(batch_blocks, tokenizer.pad_token_id, local.packing)
        out = {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids}
        if batch.attention_mask is not None:
            out["attention_mask"] = batch.attention_mask
        return out

    training_args = TrainingArguments(
        output_dir=str(Path(args.work) / "hf-trainer"),
        per_device_train_batch_size=local.micro_batch_size,
        per_device_eval_batch_size=local.eval_batch_size,
        gradient_accumulation_steps=local.grad_accumulation,
        learning_rate=hyper.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=hyper.max_grad_norm,
        num_train_epochs=1,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        # The blocks are already in the loop's seeded order: keep it, so both variants run the same
        # micro batches (same widths, same padding) and their peak memory is that of the same work.
        train_sampling_strategy="sequential",
        seed=hyper.seed,
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        max_steps=args.max_steps or -1,
    )
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            marks.append(time.process_time())

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks,
        eval_dataset=val_blocks,
        data_collator=collator,
        callbacks=[StepTimer()],
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    trainer.evaluate()
    if args.max_steps:
        tokens = sum(len(r.input_ids) for block in blocks[: args.max_steps * local.micro_batch_size] for r in block)
    return {
        "tokens_per_s": tokens / seconds,
        "cpu_s": marks[-1] - marks[0],
        "steps": output.global_step,
        "train_loss": output.training_loss,
    }


def gemm_peak(threads: int, n: int = 2048, runs: int = 5) -> float:
    """fp32 ``torch.matmul`` FLOPs per CPU-second of this process (best of ``runs``), ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up (thread pool, packing buffers)
    best = 0.0
    for _ in range(runs):
        start = time.process_time()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / max(time.process_time() - start, 1e-9))
    return best


def workload(args: argparse.Namespace, fold: Path, local) -> dict:
    """The blocks both variants train on: tokens of optimizer steps 2..N and model FLOPs per token."""
    from transformers import AutoConfig, AutoTokenizer

    from epochwise.config.train import HyperParams
    from epochwise.local.data import IGNORE, micro_batches, pack, read_rows, shuffled, truncate
    from epochwise.local.keys import fold_files
    from epochwise.local.models import base_model_path

    hyper = HyperParams()
    path = base_model_path(args.model, fold, local)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = truncate(read_rows(fold_files(fold)["train"], tokenizer), local.seq_length)
    blocks = pack(shuffled(rows, hyper.seed * 100_003 + 1), local.seq_length, local.packing)
    batches = list(micro_batches(blocks, local.micro_batch_size, tokenizer.pad_token_id, local.packing))
    if args.max_steps:
        batches = batches[: args.max_steps]
    d, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    shapes = [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim), (heads * head_dim, d)]
    shapes += [(d, ffn), (d, ffn), (ffn, d)]
    frozen = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(hyper.lora_r * (i + o) for i, o in shapes)
    tokens = labelled = pairs = 0
    for batch in batches:
        tokens += batch.tokens
        labelled += int((batch.labels[:, 1:] != IGNORE).sum())
        for width in batch.position_ids:
            cuts = [0, *((width[1:] - width[:-1] != 1).nonzero().flatten() + 1).tolist(), len(width)]
            pairs += sum((e - s) * (e - s + 1) // 2 for s, e in zip(cuts[:-1], cuts[1:], strict=True))
    flops = (
        tokens * (4 * frozen + 6 * lora)  # frozen: forward + input grad; LoRA: forward + input and weight grads
        + labelled * 4 * d * config.vocab_size  # LM head at labelled positions: forward + input grad
        + layers * 12 * heads * head_dim * pairs  # causal attention: QK and PV forward (4), backward (8)
    )
    first = batches[0].tokens
    return {"flops_per_token": flops / tokens, "timed_tokens": tokens - first, "tokens": tokens}


def child(args: argparse.Namespace) -> None:
    result = run_loop(args) if args.variant == "loop" else run_trainer(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, fold: Path, work: Path, args: argparse.Namespace) -> dict:
    """One variant in a fresh subprocess (so ``ru_maxrss`` is its own); returns its RESULT line."""
    command = [sys.executable, __file__, "--variant", variant, "--fold", str(fold), "--work", str(work)]
    command += ["--model", args.model, "--seq-length", str(args.seq_length)]
    command += ["--micro-batch", str(args.micro_batch), "--threads", str(args.threads)]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    line = next((out for out in done.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{variant} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["loop", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--fold", help="Fold directory (default: the example fold, prepared in a temp dir).")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores now).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each variant; ratios are medians.")
    parser.add_argument("--max-steps", type=int, default=None, help="Cut the epoch to this many optimizer steps.")
    args = parser.parse_args()
    if args.variant:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    try:
        fold = Path(args.fold) if args.fold else make_fold(work / "games")
        if args.fold:  # never touch the user's fold/local: train on a copy
            fold = Path(shutil.copytree(fold, work / fold.name, ignore=shutil.ignore_patterns("local")))
        # Build the base once so neither variant pays for it; fix the thread count for both.
        from epochwise.local.models import base_model_path
        from epochwise.local.trainer import default_threads

        args.threads = args.threads or default_threads()
        hyper, local = configs(argparse.Namespace(**{**vars(args), "work": str(work)}))
        base_model_path(args.model, fold, local)
        load = workload(args, fold, local)
        runs: dict[str, list[dict]] = {"loop": [], "trainer": []}
        peaks: list[float] = []
        for repeat in range(args.repeats):
            # Alternate which variant goes first, so drift in machine load hits both alike.
            order = ("loop", "trainer") if repeat % 2 == 0 else ("trainer", "loop")
            peaks.append(gemm_peak(args.threads))
            for variant in order:
                runs[variant].append(run_child(variant, fold, work, args))
        peak = max(peaks)
        steps = f"{args.max_steps} steps of" if args.max_steps else "one epoch of"
        print(
            f"model {args.model}, seq {args.seq_length}, micro batch {args.micro_batch}, "
            f"threads {args.threads}, packing on, {steps} {fold.name}, {args.repeats} run(s) each"
        )
        print(
            f"fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s per CPU-second ({args.threads} thread(s); runs "
            f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}); model FLOPs per token "
            f"{load['flops_per_token'] / 1e6:.2f} M"
        )
        print(
            f"{'':>18} {'tokens/s':>10} {'tok/CPU-s':>10} {'MFU':>6} {'peak RSS MB':>12} {'steps':>6} {'train loss':>11}"
        )
        for r in (*runs["loop"], *runs["trainer"]):
            r["cpu_tokens_per_s"] = load["timed_tokens"] / r["cpu_s"]
            r["mfu"] = r["cpu_tokens_per_s"] * load["flops_per_token"] / peak
        for repeat in range(args.repeats):
            for name, variant in (("epochwise loop", "loop"), ("HF Trainer+peft", "trainer")):
                r = runs[variant][repeat]
                print(
                    f"{name:>18} {r['tokens_per_s']:>10.0f} {r['cpu_tokens_per_s']:>10.0f} {r['mfu']:>6.1%} "
                    f"{r['peak_rss_mb']:>12.0f} {r['steps']:>6} {r['train_loss']:>11.4f}"
                )
        pairs = list(zip(runs["loop"], runs["trainer"], strict=True))
        speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
        cpu_speed = statistics.median(a["cpu_tokens_per_s"] / b["cpu_tokens_per_s"] for a, b in pairs)
        rss = statistics.median(a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs)
        mfu = {v: statistics.median(r["mfu"] for r in runs[v]) for v in runs}
        print(
            f"ratio loop/Trainer (median over runs): tokens/s {speed:.2f}x wall, {cpu_speed:.2f}x per CPU-second "
            f"(target >= 1.25), peak RSS {rss:.3f}x (target <= 0.8); "
            f"MFU loop {mfu['loop']:.1%}, Trainer {mfu['trainer']:.1%}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
