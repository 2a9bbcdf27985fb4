"""Benchmark: orchestration overhead of ``epoch-train``, and what a no-op rerun costs, against an empty flow.

    python bench/orchestration.py [--epochs 2] [--repeat 3] [--big-mb 300] [--local]

Everything runs in this process against a fresh ``PREFECT_HOME`` (ephemeral API, warmed up first) and
the fake Together server with instant jobs and instant file validation, so the time measured is
Prefect + SDK + our code, not training. Side by side, each a median of ``--repeat``:

* ``empty flow``: a flow with no tasks (the floor of any flow run);
* ``cold``: a new tiny fold, ``--epochs`` epochs: 2 uploads, N launches, N polls, N metric reads;
* ``no-op rerun``: the same fold again: every epoch comes from Prefect's cache records;
* with ``--big-mb`` (0 = skip): the same for a fold of that many MB of ChatML JSONL (generated here;
  its cold run is made once, not repeated);
* with ``--local``: a tiny-model local fold (1 epoch), cold once, then its no-op reruns.

Each no-op rerun is also shown against its goal's baseline, ``empty flow + sha256sum`` of the fold's
files (the sha256sum measured here too): noticing that nothing changed should cost one hash of each
file and one flow run (goal: <= 1.5x). Printed: seconds, ratios, seconds per epoch above the empty
flow, and Together API calls per epoch (from the fake's request counters).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HOME = Path(tempfile.mkdtemp(prefix="epochwise-bench-"))
# Before Prefect is imported: a private PREFECT_HOME, offline-friendly settings, quiet logs.
os.environ.update(
    PREFECT_HOME=str(HOME),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    PREFECT_LOGGING_LEVEL="WARNING",
    NO_PROXY="127.0.0.1,localhost",
)

from prefect import flow  # noqa: E402

from epochwise.config.together import TogetherConfig  # noqa: E402
from epochwise.config.train import TrainConfig  # noqa: E402
from tests.fake_together.server import FakeTogether  # noqa: E402

FAST = TogetherConfig(poll_initial_s=0.01, poll_max_s=0.05, file_poll_s=0.01)


@flow(name="bench-empty")
def empty() -> None:
    """The floor: one flow run, no tasks."""


def make_fold(root: Path, tag: str, n_train: int = 200, n_val: int = 20) -> Path:
    fold = root / f"fold-{tag}"
    fold.mkdir(parents=True)

    def convo(i: int) -> str:
        return json.dumps(
            {
                "messages": [
                    {"role": "system", "content": f"bench {tag}"},
                    {"role": "user", "content": f"What is {i} squared?"},
                    {"role": "assistant", "content": str(i * i)},
                ]
            }
        )

    (fold / "train.jsonl").write_text("".join(convo(i) + "\n" for i in range(n_train)))
    (fold / "val.jsonl").write_text("".join(convo(10_000 + i) + "\n" for i in range(n_val)))
    return fold


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_big_fold(root: Path, megabytes: int) -> Path:
    """A valid fold with about ``megabytes`` MB of ChatML JSONL (~1 KB conversations; val is 1/10)."""
    fold = root / f"fold-big-{megabytes}mb"
    fold.mkdir(parents=True)
    words = "alice bob stones pile table turn takes wins rock paper scissors board move first last".split()
    filler = " ".join(words[i % len(words)] for i in range(150))
    for name, share, offset in (("train.jsonl", 0.9, 0), ("val.jsonl", 0.1, 10**8)):
        target = int(megabytes * share * 1_000_000)
        with open(fold / name, "w") as out:
            written, i = 0, 0
            while written < target:
                line = json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": f"bench big {megabytes}"},
                            {"role": "user", "content": f"{offset + i}: {filler}"},
                            {"role": "assistant", "content": f"{filler} {i}"},
                        ]
                    }
                )
                out.write(line + "\n")
                written += len(line) + 1
                i += 1
    return fold


def sha256sum(fold: Path) -> float:
    """Seconds of coreutils ``sha256sum`` over the fold's JSONL files (the goal's hashing floor)."""
    files = [str(fold / "train.jsonl"), str(fold / "val.jsonl")]
    return timed(lambda: subprocess.run(["sha256sum", *files], check=True, capture_output=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=300, help="MB of JSONL in the big fold (0: no big fold)")
    parser.add_argument("--local", action="store_true", help="also a local tiny-model fold (1 epoch)")
    args = parser.parse_args()

    from flows.epoch_train import epoch_train

    train = TrainConfig(
        backend="together", base_model="meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", epochs=args.epochs
    )
    rows: dict[str, list[float]] = {"empty flow": [], "cold": [], "no-op rerun": []}
    calls: dict[str, list[int]] = {"cold": [], "no-op rerun": []}
    goals: list[tuple[str, float, float]] = []  # (fold, rerun median, sha256sum median)
    with FakeTogether() as fake:
        fake.script.job_polls_per_state = 0  # instant jobs
        fake.script.file_polls = 0  # instant file validation
        os.environ.update(TOGETHER_BASE_URL=fake.base_url, TOGETHER_API_KEY=fake.api_key)
        warm = timed(empty)  # starts the ephemeral API; not part of any comparison
        sums: list[float] = []
        for i in range(args.repeat):
            rows["empty flow"].append(timed(empty))
            fold = make_fold(HOME, f"r{i}")
            sums.append(sha256sum(fold))
            for label in ("cold", "no-op rerun"):
                before = sum(fake.counts.values())
                rows[label].append(timed(lambda f=fold: epoch_train(str(f), train, FAST)))
                calls[label].append(sum(fake.counts.values()) - before)
        goals.append(("tiny Together fold", statistics.median(rows["no-op rerun"]), statistics.median(sums)))
        jobs, uploads = len(fake.state.jobs), fake.state.uploads
        if args.big_mb:
            big = make_big_fold(HOME, args.big_mb)
            size = sum(p.stat().st_size for p in (big / "train.jsonl", big / "val.jsonl")) / 1e6
            rows[f"cold, {size:.0f} MB"] = [timed(lambda: epoch_train(str(big), train, FAST))]
            label = f"no-op rerun, {size:.0f} MB"
            rows[label], sums = [], []
            for _ in range(args.repeat):
                rows["empty flow"].append(timed(empty))
                sums.append(sha256sum(big))
                rows[label].append(timed(lambda: epoch_train(str(big), train, FAST)))
            goals.append((f"{size:.0f} MB Together fold", statistics.median(rows[label]), statistics.median(sums)))
        if args.local:
            from tests.helpers import local_config

            local = local_config(HOME / "local")
            fold = make_fold(HOME, "local")
            local_train = TrainConfig(backend="local", epochs=1, local_model="tiny")
            rows["cold, local"] = [timed(lambda: epoch_train(str(fold), local_train, local=local))]
            rows["no-op rerun, local"], sums = [], []
            for _ in range(args.repeat):
                rows["empty flow"].append(timed(empty))
                sums.append(sha256sum(fold))
                rows["no-op rerun, local"].append(timed(lambda: epoch_train(str(fold), local_train, local=local)))
            goals.append(("tiny local fold", statistics.median(rows["no-op rerun, local"]), statistics.median(sums)))

    base = statistics.median(rows["empty flow"])
    print(
        f"epoch-train orchestration, {args.epochs} epochs, fake Together with instant jobs, "
        f"median of {args.repeat} (ephemeral API start-up {warm:.1f} s, excluded)"
    )
    print(f"{'run':<24}{'seconds':>9}{'x empty':>9}{'s/epoch over empty':>20}{'API calls/epoch':>17}")
    for label, values in rows.items():
        sec = statistics.median(values)
        per_epoch = "" if label == "empty flow" else f"{(sec - base) / args.epochs:.3f}"
        api_calls = f"{statistics.median(calls[label]) / args.epochs:.1f}" if label in calls else ""
        print(f"{label:<24}{sec:>9.2f}{sec / base:>9.1f}{per_epoch:>20}{api_calls:>17}")
    print(
        f"totals: {jobs} jobs and {uploads} uploads for {args.repeat} tiny folds "
        f"(expected {args.repeat * args.epochs} and {2 * args.repeat}: the reruns created nothing)"
    )
    print("no-op rerun against its goal's baseline, empty flow + sha256sum of the fold's files (goal <= 1.5x):")
    for name, rerun, hashing in goals:
        print(f"  {name:<22} {rerun:6.2f} s vs {base:.2f} + {hashing:.2f} s: {rerun / (base + hashing):.2f}x")


if __name__ == "__main__":
    main()
