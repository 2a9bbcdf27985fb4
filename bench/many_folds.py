"""Benchmark: ``nightly-folds/nightly`` over many Together folds on a real Prefect server and one worker.

    python bench/many_folds.py [--folds 30] [--epochs 2] [--parallel 10] [--job-s 15] [--empty-runs 4] [--fan-out threads]

Starts everything itself in a temporary directory: ``prefect server start`` (SQLite), the fake Together
(in this process; its jobs complete ``--job-s`` seconds after creation, however often they are
polled), ``epochwise deployments apply`` over ``--folds`` tiny folds, and one ``prefect worker start``
with room for the nightly run and ``--parallel`` folds. Then, side by side:

* baseline: ``--empty-runs`` runs of an empty flow deployed on the same worker, one after the other
  (wall and CPU seconds per run: child process start, Prefect import, one flow run);
* the nightly run: ``nightly-folds/nightly`` trains every fold, ``--parallel`` at a time.

Printed: wall time and its ratio to the ideal (``ceil(folds / parallel) x epochs x job-s``), the peak
number of ``epoch-train`` runs RUNNING at once (sampled every 0.5 s from the API), Together API calls
per epoch (the fake's counters), and CPU seconds per fold-epoch (server + worker + their children,
from /proc) against one empty flow run's. Job polling uses ``--poll-initial-s``/``--poll-max-s``
(the bench's epochwise.yaml), the worker polls the server every ``--worker-query-s``.

``--trace-api`` also records every HTTP request that the worker and its flow run processes send to the
Prefect server (``bench/_api_trace/sitecustomize.py``, first on their ``PYTHONPATH``) and prints the
nightly run's by route: how many, per fold-epoch, the seconds spent waiting on each, and how many were
answered other than 2xx (a busy SQLite server's 503s, which Prefect's client retries after 2, 4, 8 ... s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
BASE_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of one process (its reaped children included), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / CLK


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant (reaped ones are in their parent's cutime)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(proc_cpu_s(pid) for pid in tree)


class Api:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: dict | None = None):
        for _ in range(60):  # a busy SQLite server answers 503 now and then: that is load, not an answer
            try:
                response = httpx.request(method, f"{self.url}{path}", json=body, timeout=60)
                if response.status_code != 503:
                    response.raise_for_status()
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{method} {path}: no answer")

    def run_deployment(self, name: str, parameters: dict | None = None) -> str:
        deployment = self.call("GET", f"/deployments/name/{name}")
        return self.call("POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters or {}})[
            "id"
        ]

    def state(self, run_id: str) -> str:
        return (self.call("GET", f"/flow_runs/{run_id}").get("state") or {}).get("type", "")

    def running(self, flow_name: str) -> int:
        body = {"flows": {"name": {"any_": [flow_name]}}, "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        return self.call("POST", "/flow_runs/count", body)


def start(args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def wait_done(api: Api, run_id: str, timeout_s: float, sample=None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = api.state(run_id)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        if sample is not None:
            sample()
        time.sleep(0.5)
    raise RuntimeError(f"flow run {run_id} not finished after {timeout_s:.0f} s")


def make_folds(root: Path, count: int) -> None:
    from tests.helpers import make_fold

    for i in range(count):
        make_fold(root, f"f{i:03d}", f"bench-many-{i}-{time.time_ns()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--job-s", type=float, default=15.0, help="seconds a fake job takes (60 for the goal)")
    parser.add_argument("--empty-runs", type=int, default=4)
    parser.add_argument("--poll-initial-s", type=float, default=2.0)
    parser.add_argument("--poll-max-s", type=float, default=5.0)
    parser.add_argument("--worker-query-s", type=float, default=2.0)
    parser.add_argument("--api-slots", type=int, default=None, help="ops.together_api_slots (default: the config's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument(
        "--trace-api",
        action="store_true",
        help="record every Prefect API request of the worker and its flow runs (bench/_api_trace) and print "
        "the nightly run's requests by route: count, seconds waited, answers other than 2xx",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="the server's database (e.g. postgresql+asyncpg://prefect:prefect@127.0.0.1:5432/prefect, emptied "
        "first); default: SQLite in the temporary directory",
    )
    parser.add_argument(
        "--fan-out",
        choices=("worker", "threads"),
        default="worker",
        help="nightly-folds' fan_out: each fold its own deployment run on the worker, or a subflow in a thread",
    )
    args = parser.parse_args()

    from tests.fake_together.server import FakeTogether

    root = Path(tempfile.mkdtemp(prefix="epochwise-many-"))
    home, folds = root / "home", root / "folds"
    home.mkdir()
    make_folds(folds, args.folds)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TOGETHER_"))}
    base_env.update(
        PATH=f"{BIN}{os.pathsep}{base_env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_LOGGING_LEVEL="WARNING",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(REPO),
    )
    if args.database_url:
        base_env["PREFECT_API_DATABASE_CONNECTION_URL"] = args.database_url
        reset = [str(BIN / "prefect"), "server", "database", "reset", "--yes"]
        subprocess.run(reset, env=base_env, cwd=root, check=True, capture_output=True)
    config = root / "epochwise.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "train": {"backend": "together", "base_model": BASE_MODEL, "epochs": args.epochs},
                "together": {"poll_initial_s": args.poll_initial_s, "poll_max_s": args.poll_max_s, "file_poll_s": 0.5},
                "ops": {
                    "max_parallel_folds": args.parallel,
                    "schedule": "none",
                    **({"together_api_slots": args.api_slots} if args.api_slots else {}),
                },
            }
        )
    )
    server = worker = None
    with FakeTogether() as fake:
        fake.script.job_duration_s = args.job_s
        fake.script.file_polls = 0
        client_env = {
            **base_env,
            "PREFECT_API_URL": api_url,
            "TOGETHER_BASE_URL": fake.base_url,
            "TOGETHER_API_KEY": fake.api_key,
            "PREFECT_WORKER_QUERY_SECONDS": str(args.worker_query_s),
        }
        trace_dir = root / "trace"
        worker_env = client_env
        if args.trace_api:
            trace_dir.mkdir()
            worker_env = {
                **client_env,
                "PYTHONPATH": f"{REPO / 'bench' / '_api_trace'}{os.pathsep}{REPO}",
                "EW_TRACE_PORT": str(port),
                "EW_TRACE_DIR": str(trace_dir),
            }
        try:
            server = start(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                base_env,
                root / "server.log",
                root,
            )
            api = Api(api_url)
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{api_url}/health", timeout=5).json() is True:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"server did not start; see {root / 'server.log'}")
                time.sleep(0.5)
            subprocess.run(
                [str(BIN / "epochwise"), "deployments", "apply", "--folds-root", str(folds), "--config", str(config)],
                env=client_env,
                cwd=root,
                check=True,
                capture_output=True,
            )
            register_empty(client_env)
            worker = start(
                [str(BIN / "prefect"), "worker", "start", "--pool", "epochwise", "--limit", str(args.parallel + 2)],
                worker_env,
                root / "worker.log",
                REPO,
            )
            while not api.call("POST", "/work_pools/epochwise/workers/filter", {}):
                time.sleep(0.5)

            def cpu() -> float:
                return tree_cpu_s(server.pid) + tree_cpu_s(worker.pid)

            # Baseline: empty flow runs through the same worker, one at a time.
            walls, cpus = [], []
            for _ in range(args.empty_runs):
                before, start_t = cpu(), time.monotonic()
                run = api.run_deployment("bench-empty/empty")
                assert wait_done(api, run, 300) == "COMPLETED"
                time.sleep(1.0)  # let the worker reap the child (its CPU then counts in the worker's cutime)
                walls.append(time.monotonic() - start_t - 1.0)
                cpus.append(cpu() - before)

            peak = 0

            def sample() -> None:
                nonlocal peak
                peak = max(peak, api.running("epoch-train"))

            calls_before = sum(fake.counts.values())
            before, start_t, started_at = cpu(), time.monotonic(), time.time()
            run = api.run_deployment("nightly-folds/nightly", {"fan_out": args.fan_out})
            waves = math.ceil(args.folds / args.parallel)
            state = wait_done(api, run, 120 + 20 * waves * args.epochs * args.job_s, sample)
            wall = time.monotonic() - start_t
            time.sleep(2.0)
            spent = cpu() - before
            calls = sum(fake.counts.values()) - calls_before
            jobs = len(fake.state.jobs)
            phases = timeline(api, fake, start_t, start_t + wall, args.job_s)
        finally:
            for process in (worker, server):
                if process is not None:
                    stop(process)

    ideal = waves * args.epochs * args.job_s
    fold_epochs = args.folds * args.epochs
    empty_cpu, empty_wall = statistics.median(cpus), statistics.median(walls)
    per = spent / fold_epochs
    print(
        f"nightly-folds (fan_out={args.fan_out}): {args.folds} folds x {args.epochs} epochs, {args.parallel} at a time, "
        f"{'PostgreSQL' if args.database_url else 'SQLite'}, fake jobs of "
        f"{args.job_s:.0f} s, polls {args.poll_initial_s:g}->{args.poll_max_s:g} s, worker query {args.worker_query_s:g} s, "
        f"together-api slots {args.api_slots or 'default'}"
    )
    print(f"  state {state}; {jobs} jobs created (expected {fold_epochs})")
    print(f"  wall {wall:.1f} s, ideal {ideal:.0f} s: {wall / ideal:.2f}x ideal")
    print(f"  peak epoch-train runs RUNNING at once: {peak} (of {args.parallel})")
    print(f"  Together API calls: {calls} ({calls / fold_epochs:.1f} per epoch)")
    print(f"  CPU (server + worker + children): {spent:.1f} s, {per:.2f} s per fold-epoch")
    print(f"  empty flow run via the worker: {empty_wall:.1f} s wall, {empty_cpu:.2f} s CPU (median of {len(cpus)})")
    print(f"  CPU per fold-epoch / empty flow run: {per / empty_cpu:.2f}x")
    print("  where a fold's wall time went (seconds; median / max over folds):")
    for name, values in phases.items():
        print(f"    {name:<44} {statistics.median(values):6.1f} / {max(values):6.1f}")
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "ideal_s": ideal,
                "x_ideal": round(wall / ideal, 2),
                "peak": peak,
                "api_calls_per_epoch": round(calls / fold_epochs, 1),
                "cpu_per_fold_epoch_s": round(per, 2),
                "empty_cpu_s": round(empty_cpu, 2),
                "x_empty_cpu": round(per / empty_cpu, 2),
                "phases_median_s": {k: round(statistics.median(v), 1) for k, v in phases.items()},
            }
        )
    )
    if args.trace_api:
        print_trace(trace_dir, started_at, fold_epochs)
    if args.keep:
        print(f"  kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def timeline(api: Api, fake, nightly_start: float, nightly_end: float, job_s: float) -> dict[str, list[float]]:
    """Per fold, where its wall time went: from the nightly run's start to its child run's start, from
    there to its first job, each job's wait beyond ``job_s`` until a poll saw it completed, the gap from
    one epoch's completion to the next job, and from the last completion to the child run's end.
    Child run times come from the API (wall clock), job times from the in-process fake (monotonic)."""
    from datetime import datetime

    from epochwise.together_api import parse_suffix

    offset = time.time() - time.monotonic()  # wall clock - monotonic, to put both on one axis

    def mono(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - offset

    children = api.call("POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["epoch-train"]}}, "limit": 200})
    phases: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        phases.setdefault(name, []).append(value)

    for child in children:
        fold = (child.get("parameters") or {}).get("fold", "")
        epochs = [(parse_suffix(Path(fold).name, j.suffix), j) for j in fake.state.jobs.values()]
        jobs = [j for _, j in sorted(((e, j) for e, j in epochs if e is not None), key=lambda p: p[0])]
        if not (child.get("start_time") and child.get("end_time") and jobs and all(j.completed_mono for j in jobs)):
            continue
        begin, end = mono(child["start_time"]), mono(child["end_time"])
        add("nightly start -> child run start", begin - nightly_start)
        add("child start -> first job created", jobs[0].created_mono - begin)
        for k, job in enumerate(jobs, 1):
            add(f"epoch {k}: job done -> seen done (poll lateness)", job.completed_mono - job.created_mono - job_s)
            if k < len(jobs):
                add(f"epoch {k} seen done -> epoch {k + 1} job created", jobs[k].created_mono - job.completed_mono)
        add("last job seen done -> child run end", end - jobs[-1].completed_mono)
        add("child run end -> nightly run end", nightly_end - end)
    return phases


def print_trace(trace_dir: Path, since: float, fold_epochs: int) -> None:
    """The nightly run's Prefect API requests (from ``since``, wall clock) by route, most waited-on first."""
    routes: dict[str, list[tuple[float, int]]] = {}
    clients: set[tuple[str, str]] = set()  # (process, client): each new Prefect client first fetches a CSRF token
    for path in trace_dir.glob("api-*.tsv"):
        for line in path.read_text().splitlines():
            started, took, method, route, status, client = line.split("\t")
            if float(started) >= since:
                routes.setdefault(f"{method} {route}", []).append((float(took), int(status)))
                clients.add((path.stem, client))
    total = sum(len(v) for v in routes.values())
    waited = sum(t for v in routes.values() for t, _ in v)
    failed = sum(1 for v in routes.values() for _, status in v if not 200 <= status < 300)
    print(
        f"  Prefect API requests: {total} ({total / fold_epochs:.1f} per fold-epoch), {waited:.1f} s waited in all, "
        f"{failed} answered other than 2xx (or not at all), from {len(clients)} clients"
    )
    print(f"    {'route':<64} {'count':>6} {'per f-e':>7} {'waited s':>8} {'median ms':>9} {'max s':>6} {'not 2xx':>7}")
    for name, calls in sorted(routes.items(), key=lambda kv: -sum(t for t, _ in kv[1]))[:20]:
        times = [t for t, _ in calls]
        bad = sum(1 for _, status in calls if not 200 <= status < 300)
        print(
            f"    {name[:64]:<64} {len(calls):>6} {len(calls) / fold_epochs:>7.1f} {sum(times):>8.1f} "
            f"{1000 * statistics.median(times):>9.0f} {max(times):>6.1f} {bad:>7}"
        )


def register_empty(env: dict) -> None:
    """Deploy `bench._empty_flow.empty` on the epochwise pool (a child process of its own)."""
    code = (
        "from prefect.deployments.runner import EntrypointType\n"
        "from bench._empty_flow import empty\n"
        "empty.to_deployment(name='empty', work_pool_name='epochwise', "
        "entrypoint_type=EntrypointType.MODULE_PATH).apply()\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True)


if __name__ == "__main__":
    main()
