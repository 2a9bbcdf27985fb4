"""``publish_report``: the fold's run report as the ``<fold>-report`` markdown artifact and as files.

Called by ``epoch-train`` after every epoch, so the report is current after each one and final at the
end. Per-step losses come from Together's ``list_metrics`` (Together epochs) or the local trainer's
``metrics.json`` (local epochs); the records hash from the latest ``<fold>-prepare`` artifact; endpoints
from the latest ``<fold>-endpoints`` artifact. Reading any of them can only leave a gap in the report,
never fail the training run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import Artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from blocks.credentials import together_client
from epochwise import report as rp
from epochwise import together_api as api
from epochwise.artifacts import artifact_key
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord
from epochwise.fold import Fold
from epochwise.io import sha256_file


@task(cache_policy=NO_CACHE)
def publish_report(
    fold: str,
    records: list[EpochRecord],
    train: TrainConfig,
    together: TogetherConfig,
    uploads: list | None = None,
    ops: OpsConfig = OpsConfig(),
) -> str:
    """Write ``<fold>/report/{report.md,loss.png}`` and the ``<fold>-report`` artifact; returns the file path.

    ``uploads`` are the Together files the epochs trained on (``RemoteFile``), None for local runs.
    """
    log = get_run_logger()
    name = Path(fold).name
    if uploads:
        files = [rp.FileLineage(u.filename, u.sha256, u.id) for u in uploads]
    else:
        files = [rp.FileLineage(p.name, sha256_file(p)) for p in Fold.of(fold).files(train.method) if p.is_file()]
    model = train.base_model if records and records[0].backend == "together" else train.local_model
    settings = {"backend": records[0].backend if records else train.backend, "model": model, "epochs": train.epochs}
    hyper = train.hyper.model_dump(mode="json")
    context = rp.report_context([settings, hyper, [asdict(f) for f in files]])
    state = rp.read_report_state(fold)
    path = Path(fold) / rp.REPORT_DIR / rp.REPORT_FILE
    if rp.shows_later_report(state, records, context):  # a rerun replaying cached epochs
        log.info(f"{name}: report at {path} already covers epochs {', '.join(state.epochs)}")
        return str(path)
    curves = {r.epoch: _curve(r, together, log) for r in records if r.status == "completed"}
    lineage = rp.Lineage(_records_sha256(name), files, _endpoints(name))
    markdown = rp.report_markdown(name, records, hyper, lineage, rp.PICTURE_FILE, settings)
    key = rp.report_key(markdown, curves)
    if state is not None and state.key == key and state.context == context:  # the same report: not redrawn
        png = (path.parent / rp.PICTURE_FILE).read_bytes()
    else:
        png = rp.loss_png(name, curves)
        rp.write_report(fold, markdown, png)
        rp.write_report_state(fold, key, context, records, markdown, png)
    create_markdown_artifact(
        rp.report_markdown(name, records, hyper, lineage, rp.data_uri(png), settings),
        key=artifact_key(name, "report"),
        description=f"{name}: loss curve, epochs, price and lineage",
    )
    log.info(f"{name}: report written to {path}")
    return str(path)


def _curve(record: EpochRecord, together: TogetherConfig, log) -> rp.EpochCurve:
    if record.backend == "local":
        metrics = Path(record.model or "") / "metrics.json"
        try:
            data = orjson.loads(metrics.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning(f"epoch {record.epoch}: no per-step losses ({metrics}: {exc})")
            return rp.EpochCurve()
        steps = data.get("step_losses") or []
        val = [(float(len(steps)), data["val_loss"])] if data.get("val_loss") is not None and steps else []
        return rp.EpochCurve([(float(i), loss) for i, loss in enumerate(steps, start=1)], val)
    if record.method == "grpo":  # a post-training checkpoint, not a fine-tune job: no per-step losses to read
        return rp.EpochCurve()
    key = (together.credentials_block, record.job_id or "")
    if key in _SEEN:  # a completed job's losses never change: one task run per job and process
        return _SEEN[key]
    try:
        train, val = fetch_step_losses(record.job_id or "", together)
    except Exception as exc:  # a gap in the report, not a failed run: the epoch itself is done and paid
        log.warning(f"epoch {record.epoch}: per-step losses of {record.job_id} unavailable ({exc})")
        return rp.EpochCurve()
    _SEEN[key] = rp.EpochCurve(train, val)
    return _SEEN[key]


# Per-step losses of completed Together jobs already read in this process (the report is redrawn after
# every epoch; without this each redraw would run one cache-lookup task per earlier epoch).
_SEEN: dict[tuple[str | None, str], rp.EpochCurve] = {}


def steps_key(ctx, params: dict) -> str:
    return "together-steps-" + params["job_id"]


@task(cache_key_fn=steps_key, persist_result=True)  # a read: not under the together-api limit
def fetch_step_losses(job_id: str, together: TogetherConfig) -> tuple[list, list]:
    """A completed job's per-step (train, validation) losses; cached per job, since they never change."""
    return api.job_step_losses(together_client(together), job_id)


def _latest_rows(key: str) -> list[dict]:
    artifact = Artifact.get(key)
    if artifact is None or not artifact.data:
        return []
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return list(data) if isinstance(data, list) else []


def _records_sha256(name: str) -> str | None:
    rows = _latest_rows(artifact_key(name, "prepare"))
    return next((str(r["records sha256"]) for r in rows if r.get("records sha256")), None)


def _endpoints(name: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for row in _latest_rows(artifact_key(name, "endpoints")):
        if str(row.get("epoch", "")).isdigit() and row.get("endpoint") and row.get("routed", "yes") == "yes":
            found[int(row["epoch"])] = str(row["endpoint"])
    return found
