"""Prefect tasks of ``evaluate-epochs``: which epochs and eval folds, replies per cached chunk, scores,
the Together endpoint opened and always closed, and the published table and heatmap.

Thin wrappers over `epochwise.evaluate` (pure), `epochwise.local.generate` and `epochwise.endpoint_chat`.
What makes a rerun cheap: ``generate_replies`` is cached (Prefect cache record + persisted result) on the
epoch's identity (local run key and epoch, or the Together job), the eval fold, the content hashes of
the chunk's rows and ``max_new_tokens``; so a killed or failed evaluation generates only the chunks
that had not finished, and changing the metric re-scores without generating anything.

Credentials are resolved inside each task (blocks or environment), never passed as parameters.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.transactions import CommitMode, transaction

from blocks.credentials import together_client
from epochwise import endpoint_chat
from epochwise import endpoints_api as ea
from epochwise import evaluate as ev
from epochwise.artifacts import artifact_key
from epochwise.config.deploy import DeployConfig
from epochwise.config.evaluate import EvaluateConfig
from epochwise.config.together import TogetherConfig
from epochwise.epochs import EpochRecord, best_epoch
from epochwise.fold import Fold
from epochwise.io import atomic_write_bytes
from tasks.endpoints import (
    DeploymentRef,
    deploy_model,
    project_client,
    read_epoch_records,
    roll_back_deployment,
    wait_until_ready,
)


@dataclass(frozen=True)
class EpochTarget:
    """One epoch to evaluate and what generates its replies."""

    fold: str
    epoch: int
    backend: Literal["local", "together"]
    identity: str  # cache identity: "<run key>/epoch-<k>" (local) or the Together job id
    adapter_dir: str | None = None
    base_model: str | None = None
    job_id: str | None = None
    model: str | None = None  # Together: the epoch's model (a registry path for a GRPO epoch)


@dataclass(frozen=True)
class EvalEndpoint:
    """The endpoint an epoch is evaluated on, and what closing it must undo."""

    model: str  # endpoint name for chat.completions
    ref: DeploymentRef | None  # set when this evaluation deployed (or restarted) it
    created: bool  # the deployment was created by this evaluation: delete it; else scale it back to zero


# ---------------------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def find_eval_folds(patterns: list[str]) -> list[str]:
    """Fold directories (with a ``val.jsonl``) matching the globs or paths, sorted by name."""
    found = {str(Path(p)) for pattern in patterns for p in glob.glob(pattern) if Fold.of(p).val.is_file()}
    if not found:
        raise ev.EvaluationError(f"--on {' '.join(patterns)}: no fold directory with a val.jsonl")
    names: dict[str, str] = {}
    for path in sorted(found):
        if Path(path).name in names:
            raise ev.EvaluationError(f"eval folds {names[Path(path).name]} and {path} have the same name")
        names[Path(path).name] = path
    return [names[n] for n in sorted(names)]


@task(cache_policy=NO_CACHE)
def check_metrics(specs: list[str], eval_folds: list[str], max_rows: int | None) -> list[str]:
    """Parse every metric and run the per-row ones on each eval fold's first row, before anything is
    generated or deployed; returns the specs."""
    if not specs:
        raise ev.EvaluationError("no --metric given")
    metrics = [ev.parse_metric(s) for s in specs]
    for fold in eval_folds:
        ev.check_metrics(metrics, ev.read_eval_rows(fold, max_rows)[0])
    return specs


@task(cache_policy=NO_CACHE)
def pick_eval_epochs(fold: str, epochs: str, together: TogetherConfig) -> list[EpochTarget]:
    """The finished epochs of ``fold`` chosen by ``epochs`` (all, best or 1,3), with what generates from each."""
    records = [r for r in read_epoch_records(fold, together) if r.status == "completed"]
    best = best_epoch(records)
    chosen = ev.parse_epochs(epochs, [r.epoch for r in records], best.epoch if best else None)
    targets = []
    for record in sorted((r for r in records if r.epoch in chosen), key=lambda r: r.epoch):
        if record.backend == "local":
            metrics = orjson.loads((Path(record.model or "") / "metrics.json").read_bytes())
            targets.append(
                EpochTarget(
                    record.fold,
                    record.epoch,
                    "local",
                    f"{metrics['run_key']}/epoch-{record.epoch}",
                    adapter_dir=metrics["adapter_dir"],
                    base_model=metrics["base_model"],
                )
            )
        else:
            if not record.job_id:
                raise ev.EvaluationError(f"{record.fold} epoch {record.epoch} has no Together job to evaluate")
            targets.append(
                EpochTarget(record.fold, record.epoch, "together", record.job_id, job_id=record.job_id, model=record.model)
            )
    return targets


# ---------------------------------------------------------------------------------------------------
# Together endpoint: reuse if up, else deploy; always closed
# ---------------------------------------------------------------------------------------------------


def estimate_tokens(eval_folds: list[str], settings: EvaluateConfig) -> int:
    """Prompt tokens (~4 characters each) plus ``max_new_tokens`` per row, over all eval folds."""
    total = 0
    for fold in eval_folds:
        for row in ev.read_eval_rows(fold, settings.max_rows):
            total += sum(len(m["content"]) for m in row.prompt) // 4 + settings.max_new_tokens
    return total


@task(cache_policy=NO_CACHE)
def open_eval_endpoint(
    target: EpochTarget,
    eval_folds: list[str],
    settings: EvaluateConfig,
    spent_usd: float,
    deploy: DeployConfig,
    together: TogetherConfig,
) -> tuple[EvalEndpoint, float]:
    """The epoch's endpoint: reused when its deployment of this model is READY, else deployed with
    ``deploy-epoch``'s machinery and waited for. The price estimate is logged first, and an epoch whose
    estimate would take the total past ``budget_usd`` stops here, before anything is created.
    Returns the endpoint and the estimated price (0 when unknown)."""
    log = get_run_logger()
    client = project_client(together)
    target_model = ea.model_of_epoch(client, target.job_id or "", target.model)
    slug = ea.endpoint_slug(target.fold, target.epoch)
    live = None
    existing = ea.find_endpoint(client, slug)
    if existing is not None:
        live = next(
            (
                d
                for d in ea.list_deployments(client, existing.id)
                if d.model == target_model.model_path
                and d.state == "DEPLOYMENT_STATE_READY"
                and not d.stopped
                and any(t[0] == d.id for t in existing.traffic)
            ),
            None,
        )
    config = ea.choose_config(client, target_model, deploy.hardware)
    hardware = ea.config_hardware(config)
    price = endpoint_chat.estimate(
        estimate_tokens(eval_folds, settings),
        endpoint_chat.hourly_price_usd(client, hardware),
        settings.tokens_per_s,
        settings.startup_min,
        starts=live is None,
    )
    log.info(f"{target.fold} epoch {target.epoch} on {hardware}: {price.describe()}")
    cost = price.usd or 0.0
    if settings.budget_usd is not None and spent_usd + cost > settings.budget_usd:
        raise ev.EvaluationError(
            f"evaluating {target.fold} epoch {target.epoch} on {hardware} ({price.describe()}) with "
            f"${spent_usd:.2f} already estimated would go over the budget of ${settings.budget_usd:.2f}"
        )
    if live is not None:
        log.info(f"reusing {existing.name}: {live.name} is READY (left running after the evaluation)")
        return EvalEndpoint(existing.name, None, False), cost
    record = EpochRecord(fold=target.fold, epoch=target.epoch, backend="together", job_id=target.job_id)
    ref = deploy_model(record, deploy, together)
    endpoint = EvalEndpoint(ref.endpoint_name, ref, ref.deployment_created)
    try:
        wait_until_ready(ref, deploy, together)
    except BaseException as exc:
        try:
            close_eval_endpoint.fn(endpoint, together)
        except Exception as failed:  # say both: why it never got ready, and what is still live
            raise ea.EndpointFailure(f"{exc}; {failed}") from None
        raise
    return endpoint, cost


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def close_eval_endpoint(endpoint: EvalEndpoint, together: TogetherConfig) -> list[str]:
    """Undo what ``open_eval_endpoint`` started: delete a deployment it created (and an endpoint it
    created, restoring the traffic split), or scale a deployment it restarted back to zero."""
    if endpoint.ref is None:
        return []
    client = project_client(together)
    ref = endpoint.ref
    if endpoint.created:
        done = roll_back_deployment(client, ref)
    else:
        ea.scale_to_zero(client, ref.endpoint_id, ref.deployment_id)
        done = [f"scaled {ref.deployment_name} to zero"]
    get_run_logger().info(f"evaluation over, {ref.endpoint_name} no longer bills: {', '.join(done)}")
    return done


# ---------------------------------------------------------------------------------------------------
# Generate and score
# ---------------------------------------------------------------------------------------------------


def _chunk_key(_: Any, parameters: dict[str, Any]) -> str:
    """Epoch identity + eval fold + the chunk's row content hashes + max_new_tokens (not the endpoint name)."""
    payload = {
        "epoch": parameters["target"].identity,
        "fold": parameters["eval_fold"],
        "rows": [r.key for r in parameters["rows"]],
        "max_new_tokens": parameters["max_new_tokens"],
    }
    return "evaluate-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@task(cache_key_fn=_chunk_key, persist_result=True, task_run_name="generate {eval_fold} epoch {target.epoch}")
def generate_replies(
    target: EpochTarget,
    eval_fold: str,
    rows: list[ev.EvalRow],
    max_new_tokens: int,
    model: str | None,
    concurrency: int,
    together: TogetherConfig,
) -> list[str]:
    """Greedy replies to one chunk of rows: a local batch from the epoch's adapter, or concurrent chat
    completions on ``model`` (the endpoint)."""
    conversations = [r.messages() for r in rows]
    if target.backend == "local":
        from epochwise.local.generate import generate_batch

        return generate_batch(target.adapter_dir or "", target.base_model or "", conversations, max_new_tokens)
    client = together_client(together)
    return endpoint_chat.chat_replies(client, model or "", conversations, max_new_tokens, concurrency)


@task(cache_policy=NO_CACHE, task_run_name="score {eval_fold} epoch {target.epoch}")
def score_epoch_on_fold(
    target: EpochTarget,
    eval_fold: str,
    specs: list[str],
    settings: EvaluateConfig,
    model: str | None,
    together: TogetherConfig,
) -> dict[str, Any]:
    """Generate (chunk by chunk, cached) and score every row of ``eval_fold``'s ``val.jsonl``.

    Per-row metrics run after each chunk, so a failing metric stops the evaluation early and names the
    row; the chunks already generated stay cached. Returns ``{epoch, fold, rows, scores, generated, reused}``.
    """
    name = Path(eval_fold).name
    rows = ev.read_eval_rows(eval_fold, settings.max_rows)
    metrics = [ev.parse_metric(s) for s in specs]
    size = settings.batch_size if target.backend == "local" else settings.chunk_rows
    replies: list[str] = []
    generated = reused = 0
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        # EAGER: the chunk's cache record is written when it finishes, not when this task does (a nested
        # task's record otherwise waits for the outer one and is lost when a later chunk fails).
        with transaction(commit_mode=CommitMode.EAGER):
            state = generate_replies(
                target, name, chunk, settings.max_new_tokens, model, settings.concurrency, together, return_state=True
            )
        chunk_replies = state.result()
        if state.name == "Cached":
            reused += len(chunk)
        else:
            generated += len(chunk)
        ev.score_replies([m for m in metrics if m.row is not None], chunk, chunk_replies)
        replies.extend(chunk_replies)
    scores = ev.score_replies(metrics, rows, replies)
    get_run_logger().info(
        f"{target.fold} epoch {target.epoch} on {name}: {len(rows)} rows ({generated} generated, "
        f"{reused} from cache): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    )
    return {
        "epoch": target.epoch,
        "fold": name,
        "rows": len(rows),
        "scores": scores,
        "generated": generated,
        "reused": reused,
    }


# ---------------------------------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def publish_evaluation(fold: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``<fold>-evaluation`` table artifact, ``<fold>/evaluation/{table.json,heatmap.png}`` (atomic)
    and the ``<fold>-evaluation-heatmap`` markdown artifact; returns the rows, the best-eval epoch and paths."""
    from epochwise.evaluation_report import heatmap_png, markdown

    name = Fold.of(fold).name
    rows = ev.table_rows(results)
    best = ev.best_eval_epoch(rows)
    out = Path(fold) / "evaluation"
    png = heatmap_png(rows, f"{name}: epochs x eval folds")
    atomic_write_bytes(out / "heatmap.png", png)
    atomic_write_bytes(out / "table.json", orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    metric = ev.metric_names(rows)[0]
    create_table_artifact(
        rows,
        key=artifact_key(name, "evaluation"),
        description=f"{name}: epoch x eval fold x metric; best-eval epoch {best} by mean {metric}",
    )
    create_markdown_artifact(
        markdown(rows, png, name, best),
        key=artifact_key(name, "evaluation-heatmap"),
        description=f"{name} evaluation heatmap",
    )
    return {
        "rows": rows,
        "best_eval_epoch": best,
        "metric": metric,
        "heatmap": str(out / "heatmap.png"),
        "table": str(out / "table.json"),
        "results": results,
    }
