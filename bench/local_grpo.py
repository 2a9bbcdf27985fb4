"""Local GRPO epoch vs TRL's ``GRPOTrainer``: completions/s on the same model, data and settings, side by side.

One GRPO epoch of 100 prompts x 4 completions x 32 new tokens on the ``tiny`` model (the rock-paper-scissors
example's prompts and its two rewards, ``examples/rewards/rps.py``), LoRA r=16 on all linear layers, 8
completions (2 prompts) per optimizer step = 50 steps, temperature 1.0, no top-k/top-p cut, ``beta=0``, fp32,
no gradient checkpointing, the same torch threads. Each variant runs in its own subprocess; the time is
the wall time of the epoch (ours: `train_grpo_epoch` without validation or sample, model load and
adapter save included; TRL: ``trainer.train()``, its model already built). Target: >= 1.0x TRL's throughput.

TRL is run the way its docs say for CPU (https://huggingface.co/docs/trl/main/en/grpo_trainer): ``use_cpu``,
``bf16=False`` (its default bf16 autocast is much slower on a CPU without bf16) and no gradient checkpointing.

    nice -n 10 .venv/bin/python bench/local_grpo.py            # 1 run each, 1 thread
    nice -n 10 .venv/bin/python bench/local_grpo.py --runs 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS, GENERATIONS, NEW_TOKENS, PER_STEP = 100, 4, 32, 8
REWARDS = ["examples/rewards/rps.py:format_reward", "examples/rewards/rps.py:correctness_reward"]


def make_fold(work: Path) -> Path:
    """The GRPO example's prompt rows, the first 100 as the train file (no validation file)."""
    from epochwise.config import load_settings
    from epochwise.prepare import prepare
    from epochwise.records import read_records

    records = REPO / "examples" / "records" / "rps-grpo"
    full = work / "full"
    prepare(
        read_records(records).records,
        full,
        load_settings(REPO / "epochwise.yaml", records_file=records / "epochwise.yaml").data,
    )
    fold = work / "rps-bench"
    fold.mkdir()
    lines = (full / "train_grpo.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]
    assert len(lines) == PROMPTS, len(lines)
    (fold / "train_grpo.jsonl").write_text("".join(lines))
    return fold


def settings(work: Path, threads: int):
    from epochwise.config.local import LocalConfig
    from epochwise.config.train import GRPOParams, HyperParams, TrainConfig

    local = LocalConfig(threads=threads, micro_batch_size=PER_STEP, cache_dir=work / "models", sample_max_new_tokens=0)
    grpo = GRPOParams(num_generations=GENERATIONS, max_new_tokens=NEW_TOKENS, prompts_per_step=PER_STEP // GENERATIONS)
    train = TrainConfig(
        backend="local", method="grpo", rewards=REWARDS, hyper=HyperParams(learning_rate=1e-4), grpo=grpo
    )
    return train, local


def run_ours(fold: Path, work: Path, threads: int) -> dict:
    from epochwise.local.grpo import train_grpo_epoch
    from epochwise.local.models import base_model_path
    from epochwise.rewards import load_rewards
    from tasks.local_rl import rl_run_key

    train, local = settings(work, threads)
    base_model_path("tiny", fold, local, "grpo")  # built once, before the clock (TRL gets it built too)
    key = rl_run_key(str(fold), train, local) + f"-{time.time_ns()}"  # a fresh run directory per run
    start = time.perf_counter()
    result = train_grpo_epoch(fold, 1, "tiny", train, load_rewards(REWARDS, REPO), local, key)
    seconds = time.perf_counter() - start
    steps_s = result.metrics["completion_tokens"] * PROMPTS * GENERATIONS / result.tokens_per_s
    return {"seconds": seconds, "steps": result.steps, "reward_mean": result.metrics["reward_mean"], "steps_s": steps_s}


def run_trl(fold: Path, work: Path, threads: int) -> dict:
    import orjson
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from epochwise.local.models import base_model_path
    from epochwise.rewards import load_rewards

    train, local = settings(work, threads)
    torch.set_num_threads(threads)
    path = base_model_path("tiny", fold, local, "grpo")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [orjson.loads(line) for line in (fold / "train_grpo.jsonl").read_bytes().splitlines()]
    data = Dataset.from_list([{"prompt": row["messages"], "answer": row["answer"]} for row in rows])
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=PER_STEP,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        num_train_epochs=1,
        learning_rate=1e-4,
        temperature=1.0,
        beta=0.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        seed=train.hyper.seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[r.fn for r in load_rewards(REWARDS, REPO)],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    return {"seconds": seconds, "steps": trainer.state.global_step, "reward_mean": statistics.mean(rewards)}


def child(variant: str, fold: str, work: str, threads: int) -> None:
    runner = run_ours if variant == "ours" else run_trl
    print(json.dumps(runner(Path(fold), Path(work), threads)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each variant (alternating)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both variants")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, fold, work = args.child
        child(variant, fold, work, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        fold = make_fold(work)
        results: dict[str, list[dict]] = {"ours": [], "trl": []}
        for _ in range(args.runs):
            for variant in ("ours", "trl"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--threads",
                        str(args.threads),
                        "--child",
                        variant,
                        str(fold),
                        str(work),
                    ],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode:
                    sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    completions = PROMPTS * GENERATIONS
    print(f"one GRPO epoch: {PROMPTS} prompts x {GENERATIONS} completions x {NEW_TOKENS} new tokens, tiny model, "
          f"{args.threads} thread(s), {args.runs} run(s) each")  # fmt: skip
    medians = {}
    for variant, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        medians[variant] = seconds
        print(
            f"  {variant:5s} {seconds:6.1f} s  {completions / seconds:6.1f} completions/s  steps {runs[0]['steps']}  "
            f"mean reward {statistics.mean(r['reward_mean'] for r in runs):.4f}  (runs: "
            + ", ".join(f"{r['seconds']:.1f}" for r in runs)
            + ")"
        )
    best = min(r["seconds"] for r in results["trl"]) / min(r["seconds"] for r in results["ours"])
    print(
        f"  throughput ratio ours / TRL: {medians['trl'] / medians['ours']:.2f}x of medians, {best:.2f}x of the "
        "fastest runs (target >= 1.0x; on a shared machine the fastest runs are the least disturbed)"
    )


if __name__ == "__main__":
    main()
