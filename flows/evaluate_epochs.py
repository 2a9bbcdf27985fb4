"""``evaluate-epochs``: score each chosen epoch of a fold on every eval fold's held-out conversations.

Steps:
1. find the eval folds (``--on`` globs, each a directory with ``val.jsonl``), parse the metrics and run
   the per-row ones on each eval fold's first row, before anything is generated or deployed;
2. pick the epochs (``all``, ``best`` or ``1,3``) from the fold's ``<fold>-epochs`` records (or the local
   epochs on disk);
3. per epoch: on Together, open its endpoint (reused when READY, else deployed as ``deploy-epoch`` does,
   after the price estimate is shown and checked against ``budget_usd``); per eval fold, generate the
   reply to every conversation's last assistant turn in cached chunks and score it; the endpoint is
   closed in a ``finally`` (a deployment this run created is deleted, one it restarted scaled to zero);
4. publish the ``<fold>-evaluation`` table (epoch x eval fold x metric), ``<fold>/evaluation/heatmap.png``
   and the ``<fold>-evaluation-heatmap`` markdown artifact; ``epochwise deploy --epoch best-eval`` reads
   the table (best mean of the first metric over the eval folds).

A rerun generates only the chunks not generated before (cached per epoch, eval fold and row content).

    epochwise evaluate folds/games --on 'folds/*' --epochs all --metric json-field:winner_with_perfect_play
    prefect deployment run evaluate-epochs/any-fold --param fold=/srv/folds/games --param 'on=["/srv/folds/*"]'
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from epochwise.config.deploy import DeployConfig
from epochwise.config.evaluate import EvaluateConfig
from epochwise.config.together import TogetherConfig
from tasks.evaluate import (
    check_metrics,
    close_eval_endpoint,
    find_eval_folds,
    open_eval_endpoint,
    pick_eval_epochs,
    publish_evaluation,
    score_epoch_on_fold,
)


@flow(name="evaluate-epochs", log_prints=True, validate_parameters=True)
def evaluate_epochs(
    fold: str,
    on: list[str],
    evaluate: EvaluateConfig = EvaluateConfig(),
    deploy: DeployConfig = DeployConfig(),
    together: TogetherConfig = TogetherConfig(),
) -> dict[str, Any]:
    """Evaluate ``evaluate.epochs`` of ``fold`` on the folds matching ``on`` with ``evaluate.metrics``."""
    eval_folds = find_eval_folds(on)
    specs = check_metrics(evaluate.metrics, eval_folds, evaluate.max_rows)
    targets = pick_eval_epochs(fold, evaluate.epochs, together)
    print(f"evaluating {fold} epochs {', '.join(str(t.epoch) for t in targets)} on {', '.join(eval_folds)}")
    results, spent = [], 0.0
    for target in targets:
        endpoint = None
        if target.backend == "together":
            endpoint, cost = open_eval_endpoint(target, eval_folds, evaluate, spent, deploy, together)
            spent += cost
        try:
            for eval_fold in eval_folds:
                results.append(
                    score_epoch_on_fold(
                        target, eval_fold, specs, evaluate, endpoint.model if endpoint else None, together
                    )
                )
        finally:
            if endpoint is not None:
                close_eval_endpoint(endpoint, together)
    summary = publish_evaluation(fold, results)
    print(f"best-eval epoch {summary['best_eval_epoch']} (mean {summary['metric']}); heatmap {summary['heatmap']}")
    return summary
