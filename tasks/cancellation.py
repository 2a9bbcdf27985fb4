"""Cancelling an ``epoch-train`` run cancels the Together jobs it started; a crashed run's jobs run on.

Three paths, because no single one is always there (the rules are in `epochwise.job_owners`):

1. ``record_job_owner``: ``launch_epoch_job`` tags its flow run ``together-job:<id>`` as soon as the
   create (or re-attach) returned, so every later path can find the job from the run, and the run from
   the job.
2. In the flow process, ``cancel_jobs_on_interrupt`` around the epoch loop: Ctrl-C (KeyboardInterrupt,
   e.g. ``epochwise train`` on the ephemeral API) cancels this run's live jobs at once; a SIGTERM
   (Prefect's TerminationSignal, what a worker sends to cancel) cancels them only if the API shows
   the run Cancelling/Cancelled, so a SIGTERM from a shutdown leaves the job for the next run.
   ``cancel_owned_jobs`` is also the flow's ``on_cancellation`` hook, for where Prefect runs it (a flow
   whose engine owns its cancellation); under a Prefect 3.8 process worker the flow process path above is
   what cancels (end-to-end test: a few seconds from ``prefect flow-run cancel``), and no hook run was
   seen in the run's logs.
3. ``reap_cancelled_jobs`` (deployment ``job-reaper/frequent``): every live ``ew-`` job at Together whose
   newest owning flow run is Cancelling/Cancelled is cancelled; the backstop when the flow process and
   the hook were both skipped (a hook skipped by the worker, a lost worker, an API outage).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.logging.loggers import flow_run_logger

from blocks.credentials import together_client
from epochwise import together_api as api
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.job_owners import Owner, cancel_requested, job_tag, tagged_jobs

# Job ids each flow run of this process created or re-attached to (flow run id -> ids, in order): what
# Ctrl-C cancels without asking the Prefect API, which may be going down with the same signal.
_OWNED: dict[str, list[str]] = {}


def _current_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


def record_job_owner(job_id: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Record ``job_id`` on the current flow run (tag ``together-job:<id>``) and in this process."""
    run_id = _current_run_id()
    if run_id is None:
        return
    owned = _OWNED.setdefault(run_id, [])
    if job_id not in owned:
        owned.append(job_id)
    tag = job_tag(job_id)
    try:
        with get_client(sync_client=True) as prefect:
            run = prefect.read_flow_run(run_id)  # type: ignore[arg-type]
            if tag not in run.tags:
                prefect.update_flow_run(run.id, tags=[*run.tags, tag])
    except Exception as exc:  # the job must not be lost over a tag: the flow process still knows it
        log.warning(f"could not tag flow run {run_id} with {tag} ({exc}); job-reaper cannot see this job")


def _cancel_live(client: Any, job_ids: list[str], why: str, log: Any) -> list[str]:
    """Cancel those of ``job_ids`` that are not finished at Together; returns the ones cancelled."""
    cancelled = []
    for job_id in job_ids:
        try:
            status = api.get_job(client, job_id).status
            if status in api.TERMINAL:
                continue
            log.warning(f"cancelling Together job {job_id} ({status}): {why}")
            api.cancel_job(client, job_id)
            cancelled.append(job_id)
        except Exception as exc:
            log.error(f"could not cancel Together job {job_id} ({exc}); cancel it with `epochwise abort`")
    return cancelled


def _owners(prefect: Any, job_id: str) -> list[Owner]:
    runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[job_tag(job_id)])))
    return [Owner(str(r.id), r.created, r.state.type.value if r.state else None) for r in runs]


def cancel_jobs_of_cancelled_runs(prefect: Any, client: Any, job_ids: list[str], log: Any) -> list[str]:
    """Cancel each of ``job_ids`` whose newest owning flow run is Cancelling/Cancelled."""
    wanted = [job_id for job_id in job_ids if cancel_requested(_owners(prefect, job_id))]
    return _cancel_live(client, wanted, "its flow run was cancelled", log)


def cancel_owned_jobs(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` hook of ``epoch-train``: cancel the live jobs this run recorded."""
    log = flow_run_logger(flow_run)
    together = TogetherConfig.model_validate((flow_run.parameters or {}).get("together") or {})
    with get_client(sync_client=True) as prefect:
        job_ids = tagged_jobs(prefect.read_flow_run(flow_run.id).tags)
        if job_ids:
            cancel_jobs_of_cancelled_runs(prefect, together_client(together), job_ids, log)


@contextlib.contextmanager
def cancel_jobs_on_interrupt(together: TogetherConfig) -> Iterator[None]:
    """Around the epoch loop: Ctrl-C cancels this run's live jobs; a cancel's SIGTERM does too."""
    run_id = _current_run_id()
    try:
        yield
    except KeyboardInterrupt:
        _cancel_live(together_client(together), _OWNED.get(run_id or "", []), "interrupted (Ctrl-C)", get_run_logger())
        raise
    except TerminationSignal:
        # A worker's SIGTERM comes right after the run went Cancelling; any other SIGTERM (a shutdown, a
        # supervisor) leaves the job running for the next run to re-attach.
        log = get_run_logger()
        try:
            with get_client(sync_client=True) as prefect:
                cancel_jobs_of_cancelled_runs(prefect, together_client(together), _OWNED.get(run_id or "", []), log)
        except Exception as exc:
            log.error(f"could not check whether this run was cancelled ({exc}); job-reaper will")
        raise


@task(cache_policy=NO_CACHE, tags=[OpsConfig().together_api_tag])
def reap_cancelled_jobs(together: TogetherConfig) -> list[str]:
    """Cancel every live epochwise job at Together whose newest owning flow run was cancelled."""
    client = together_client(together)
    live = [j.id for j in api.list_jobs(client) if j.status not in api.TERMINAL and (j.suffix or "").startswith("ew-")]
    with get_client(sync_client=True) as prefect:
        return cancel_jobs_of_cancelled_runs(prefect, client, live, get_run_logger())
