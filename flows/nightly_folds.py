"""``nightly-folds``: train every fold under a folds root, a few at a time, each as its own flow run.

Steps: list the folds (every sub-directory with a ``train.jsonl``, looked up at run time, so a fold added
since the last ``epochwise deployments apply`` is included) -> for each fold, hold a slot of the global
concurrency limit ``limit`` and start that fold's deployment ``epoch-train/<fold>`` (its limit of one run
at a time keeps a fold from running twice; a fold without one goes to ``epoch-train/any-fold``) through
``run_deployment`` (a separate process on a worker, shown under this run in the UI) and wait for it ->
a ``<root>-nightly`` table artifact with each fold's final state. The run fails if any fold failed, after
all folds finished.

With ``fan_out=threads`` (``ops.nightly_fan_out``) each fold runs instead as an ``epoch-train`` subflow
of this run, in a thread of this process, with the parameters of the deployment it would have run
(`tasks.fan_out.fold_parameters`), still one slot of ``limit`` each: no process start per fold (about
7 CPU-seconds each on a small machine), for many Together folds that mostly wait on their jobs. A
cancel of this run cancels the folds' jobs (`tasks.cancellation.stop_chains_on_interrupt`); a local
fold trains in this process.

Finished epochs are cached by epoch-train, so a fold with nothing new to do is a quick no-op. The worker
needs room for this run plus ``max_parallel_folds`` children (``prefect worker start --limit``).

    prefect deployment run nightly-folds/nightly
    prefect deployment run nightly-folds/nightly --param folds_root=/srv/folds
    prefect deployment run nightly-folds/nightly --param fan_out=threads
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact
from prefect.context import get_run_context

from epochwise.artifacts import artifact_key
from epochwise.config.ops import OpsConfig
from epochwise.fold import Fold
from flows.epoch_train import epoch_train
from tasks.cancellation import stop_chains_on_interrupt
from tasks.fan_out import fold_parameters, limit_slots, list_folds, run_fold_deployment, run_fold_here


@flow(name="nightly-folds", log_prints=True)
def nightly_folds(
    folds_root: str,
    flow_name: str = "epoch-train",
    limit: str = OpsConfig.model_fields["nightly_limit"].default,
    fan_out: Literal["worker", "threads"] = OpsConfig.model_fields["nightly_fan_out"].default,
) -> list[dict[str, str]]:
    """Train every fold under ``folds_root`` with ``flow_name``'s deployments, bounded by the limit ``limit``."""
    folds = list_folds(folds_root)
    print(f"{len(folds)} fold(s) under {folds_root}: {', '.join(Fold.of(f).name for f in folds) or 'none'}")
    if fan_out == "threads":
        results = _run_folds_here(folds, flow_name, limit)
    else:
        run = get_run_context().flow_run
        parent_key = f"nightly-folds:{run.id}:{run.run_count}"
        results = run_fold_deployment.map(folds, unmapped(flow_name), unmapped(limit), unmapped(parent_key)).result()
    create_table_artifact(
        key=artifact_key(Path(folds_root).name, "nightly"),
        table=results or [{"fold": "none", "state": "no folds found"}],
        description=f"nightly-folds over {folds_root}",
    )
    failed = [r["fold"] for r in results if r["state"] != "Completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} fold(s) did not complete: {', '.join(failed)}")
    return results


def _run_folds_here(folds: list[str], flow_name: str, limit: str) -> list[dict[str, str]]:
    """Each fold as an ``epoch-train`` subflow in a thread of its own, as many threads as ``limit`` has
    slots (the context copied, as Prefect's thread pool task runner does; not inside a task, whose
    transaction would hold back the commits of every task of the chain)."""
    if not folds:
        return []
    params = [fold_parameters(flow_name, fold) for fold in folds]  # fails early on another flow than epoch-train
    pool = ThreadPoolExecutor(max_workers=min(limit_slots(limit), len(folds)), thread_name_prefix="fold")
    try:
        with stop_chains_on_interrupt():  # this process's signals reach only this thread
            futures = [
                pool.submit(contextvars.copy_context().run, run_fold_here, epoch_train, p, limit) for p in params
            ]
            return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # after an interrupt, do not wait for the chains
