"""``nightly-folds``: train every fold under a folds root, a few at a time, each as its own flow run.

Steps: list the folds (every sub-directory with a ``train.jsonl``, looked up at run time, so a fold added
since the last ``epochwise deployments apply`` is included) -> for each fold, hold a slot of the global
concurrency limit ``limit`` and start that fold's deployment ``epoch-train/<fold>`` (its limit of one run
at a time keeps a fold from running twice; a fold without one goes to ``epoch-train/any-fold``) through
``run_deployment`` (a separate process on a worker, shown under this run in the UI) and wait for it ->
a ``<root>-nightly`` table artifact with each fold's final state. The run fails if any fold failed, after
all folds finished.

Finished epochs are cached by epoch-train, so a fold with nothing new to do is a quick no-op. The worker
needs room for this run plus ``max_parallel_folds`` children (``prefect worker start --limit``).

    prefect deployment run nightly-folds/nightly
    prefect deployment run nightly-folds/nightly --param folds_root=/srv/folds
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact
from prefect.context import get_run_context

from epochwise.artifacts import artifact_key
from epochwise.config.ops import OpsConfig
from epochwise.fold import Fold
from tasks.fan_out import list_folds, run_fold_deployment


@flow(name="nightly-folds", log_prints=True)
def nightly_folds(
    folds_root: str,
    flow_name: str = "epoch-train",
    limit: str = OpsConfig.model_fields["nightly_limit"].default,
) -> list[dict[str, str]]:
    """Train every fold under ``folds_root`` with ``flow_name``'s deployments, bounded by the limit ``limit``."""
    folds = list_folds(folds_root)
    print(f"{len(folds)} fold(s) under {folds_root}: {', '.join(Fold.of(f).name for f in folds) or 'none'}")
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
