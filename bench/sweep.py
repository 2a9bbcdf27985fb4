"""Benchmark: ``epochwise sweep`` on the Together backend against the fake server, median pruner vs none.

    python bench/sweep.py [--trials 6] [--epochs 3] [--budget 20]

Everything runs in this process against a fresh ``PREFECT_HOME`` (ephemeral API) and the fake Together
server (instant file validation, jobs that finish in a few polls, $1.50 per epoch). The fake's
validation loss of a job depends on its learning rate (best at 1e-4) and its depth in the chain, so
the pruner has bad chains to stop. Side by side, on two folds of the same content:

* ``pruner none``: every admitted chain trains all its epochs;
* ``median``: the median pruner stops chains worse than the finished ones' median after an epoch.

Printed per mode: wall seconds, trials asked, epochs trained (= Together jobs created), epochs pruning
saved, money spent against the budget, the best (trial, epoch); and the ratio median / none.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HOME = Path(tempfile.mkdtemp(prefix="epochwise-bench-sweep-"))
os.environ.update(
    PREFECT_HOME=str(HOME),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    PREFECT_LOGGING_LEVEL="WARNING",
    NO_PROXY="127.0.0.1,localhost",
    EPOCHWISE_TOGETHER__POLL_INITIAL_S="0.01",
    EPOCHWISE_TOGETHER__POLL_MAX_S="0.05",
    EPOCHWISE_TOGETHER__FILE_POLL_S="0.01",
)

from tests.fake_together.server import FakeTogether  # noqa: E402
from tests.helpers import BASE, make_fold  # noqa: E402

SPACE = """\
train.hyper.learning_rate: {log_uniform: [1e-6, 1e-2]}
train.epochs: %d
"""


def lr_loss(body: dict, depth: int) -> tuple[float, float]:
    miss = abs(math.log10(float(body["learning_rate"])) + 4)
    val = round(1.0 + 0.8 * miss + 0.6 / depth, 4)
    return round(val - 0.1, 4), val


def run(fake: FakeTogether, root: Path, mode: str, args: argparse.Namespace) -> dict:
    from typer.testing import CliRunner

    from epochwise import sweep as sw
    from epochwise.cli import app

    fold = make_fold(root, f"bench-{mode}", "bench-sweep-" + mode)
    space = root / "space.yaml"
    space.write_text(SPACE % args.epochs)
    jobs_before = len(fake.state.jobs)
    start = time.perf_counter()
    result = CliRunner().invoke(app, [
        "sweep", str(fold), "--space", str(space), "--name", "lr", "--trials", str(args.trials),
        "--parallel", "1", "--budget", str(args.budget), "--sampler", "random", "--seed", "3",
        "--pruner", mode, "--backend", "together", "--base-model", BASE,
    ])
    wall = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"{mode}: exit {result.exit_code}\n{result.output[-3000:]}")
    _, trials = sw.load_trials(fold, "lr")
    epochs = sum(len(sw.trial_epochs(t, fold.name)) for t in trials)
    spent = sum(r.price_usd or 0 for t in trials for r in sw.trial_epochs(t, fold.name))
    best = sw.best_trial_epoch(sw.candidates(trials, fold.name))
    return {
        "wall_s": wall,
        "trials": len(trials),
        "states": [sw.trial_state(t) for t in trials],
        "epochs": epochs,
        "jobs": len(fake.state.jobs) - jobs_before,
        "saved": sum(args.epochs - len(sw.trial_epochs(t, fold.name)) for t in trials if sw.trial_state(t) == "pruned"),
        "spent": spent,
        "best": (best.trial, best.record.epoch, best.record.val_loss) if best else None,
        "output": result.output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0)
    args = parser.parse_args()
    root = HOME / "folds"
    with FakeTogether() as fake:
        os.environ.update(TOGETHER_BASE_URL=fake.base_url, TOGETHER_API_KEY=fake.api_key)
        fake.script.loss_for = lr_loss
        results = {mode: run(fake, root, mode, args) for mode in ("none", "median")}
    for mode, r in results.items():
        print(f"pruner {mode:6}: {r['wall_s']:6.1f} s, {r['trials']} trial(s) {r['states']}, {r['epochs']} epoch(s) = "
              f"{r['jobs']} job(s), {r['saved']} epoch(s) saved by pruning, ${r['spent']:.2f} of ${args.budget:.2f}, "
              f"best (trial, epoch, val loss) {r['best']}")
    none, median = results["none"], results["median"]
    print(f"median / none: wall {median['wall_s'] / none['wall_s']:.2f}x, jobs {median['jobs'] / none['jobs']:.2f}x, "
          f"trials {median['trials']}/{none['trials']} within the same budget")
    print("\n--- median run, as printed by `epochwise sweep` ---\n" + median["output"][-2500:])


if __name__ == "__main__":
    main()
