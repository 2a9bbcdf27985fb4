"""Benchmark: orchestration overhead of ``epoch-train`` on the Together backend, against an empty flow.

    python bench/orchestration.py [--epochs 5] [--repeat 3]

Everything runs in this process against a fresh ``PREFECT_HOME`` (ephemeral API, warmed up first) and
the fake Together server with instant jobs and instant file validation, so the time measured is
Prefect + SDK + our code, not training. Side by side:

* ``empty flow``: a flow with no tasks (the floor of any flow run);
* ``cold``: a new fold, ``--epochs`` epochs: 2 uploads, N launches, N polls, N metric reads;
* ``no-op rerun``: the same fold again: every epoch comes from Prefect's cache records.

Printed: seconds (median of ``--repeat``), the ratio to the empty flow, seconds per epoch above the
empty flow, and Together API calls per epoch (from the fake's request counters).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from flows.epoch_train import epoch_train

    train = TrainConfig(
        backend="together", base_model="meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", epochs=args.epochs
    )
    with FakeTogether() as fake:
        fake.script.job_polls_per_state = 0  # instant jobs
        fake.script.file_polls = 0  # instant file validation
        os.environ.update(TOGETHER_BASE_URL=fake.base_url, TOGETHER_API_KEY=fake.api_key)
        warm = timed(empty)  # starts the ephemeral API; not part of any comparison
        rows: dict[str, list[float]] = {"empty flow": [], "cold": [], "no-op rerun": []}
        calls: dict[str, list[int]] = {"cold": [], "no-op rerun": []}
        for i in range(args.repeat):
            rows["empty flow"].append(timed(empty))
            fold = make_fold(HOME, f"r{i}")
            for label in ("cold", "no-op rerun"):
                before = sum(fake.counts.values())
                rows[label].append(timed(lambda f=fold: epoch_train(str(f), train, FAST)))
                calls[label].append(sum(fake.counts.values()) - before)
        jobs, uploads = len(fake.state.jobs), fake.state.uploads

    base = statistics.median(rows["empty flow"])
    print(
        f"epoch-train orchestration, {args.epochs} epochs, fake Together with instant jobs, "
        f"median of {args.repeat} (ephemeral API start-up {warm:.1f} s, excluded)"
    )
    print(f"{'run':<14}{'seconds':>9}{'x empty':>9}{'s/epoch over empty':>20}{'API calls/epoch':>17}")
    for label, values in rows.items():
        sec = statistics.median(values)
        per_epoch = "" if label == "empty flow" else f"{(sec - base) / args.epochs:.3f}"
        api_calls = "" if label == "empty flow" else f"{statistics.median(calls[label]) / args.epochs:.1f}"
        print(f"{label:<14}{sec:>9.2f}{sec / base:>9.1f}{per_epoch:>20}{api_calls:>17}")
    print(
        f"totals: {jobs} jobs and {uploads} uploads for {args.repeat} folds "
        f"(expected {args.repeat * args.epochs} and {2 * args.repeat}: the reruns created nothing)"
    )


if __name__ == "__main__":
    main()
