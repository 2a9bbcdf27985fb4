"""Cancelling an ``epoch-train`` run cancels the Together jobs it started; a crashed run's jobs run on.

Three paths, because no single one is always there (the rules are in `epochwise.job_owners`):

1. ``record_job_owner``: ``launch_epoch_job`` tags its flow run ``together-job:<id>`` as soon as the
   create (or re-attach) returned, so every later path can find the job from the run, and the run from
   the job. Before the create it tags the run ``together-suffix:<suffix>`` (``record_creating``): a
   cancel that cuts the create off finds the job Together made by its suffix (paths 2 and 3).
2. In the flow process, ``cancel_jobs_on_interrupt`` around the epoch loop: Ctrl-C (KeyboardInterrupt,
   e.g. ``epochwise train`` on the ephemeral API) cancels this run's live jobs at once; a SIGTERM
   (Prefect's TerminationSignal, what a worker sends to cancel) cancels them only if the API shows
   the run Cancelling/Cancelled, so a SIGTERM from a shutdown leaves the job for the next run.
   ``cancel_owned_jobs`` is also the flow's ``on_cancellation`` hook, for where Prefect runs it (a flow
   whose engine owns its cancellation); under a Prefect 3.8 process worker the flow process path above is
   what cancels (end-to-end test: a few seconds from ``prefect flow-run cancel``), and no hook run was
   seen in the run's logs.
   Chains that run as threads of one process (``nightly-folds`` with ``fan_out=threads``, a sweep's
   trials) never see a signal: only the main thread does. There ``stop_chains_on_interrupt`` wraps the
   wait for the threads: Ctrl-C, or the SIGTERM of the parent run's cancel, cancels the live jobs of
   every run of the process, and from then on no thread of it creates a job (`refuse_if_stopping`);
   a job whose create was already in flight is cancelled as soon as it is recorded. Any other SIGTERM
   only stops new creates, and the jobs run on for the next run to re-attach.
3. ``reap_cancelled_jobs`` (deployment ``job-reaper/frequent``): every live ``ew-`` job at Together whose
   newest owning flow run (by its job tag, else by its suffix tag) is Cancelling/Cancelled is cancelled; the backstop when the flow process and
   the hook were both skipped (a hook skipped by the worker, a lost worker, an API outage).
"""

from __future__ import annotations

import contextlib
import logging
import threading
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
from epochwise.job_owners import Owner, cancel_requested, job_tag, suffix_tag, tagged_jobs

# Job ids each flow run of this process created or re-attached to (flow run id -> ids, in order): what
# Ctrl-C cancels without asking the Prefect API, which may be going down with the same signal.
_OWNED: dict[str, list[str]] = {}
# Suffixes each flow run of this process sent a create for: an interrupt during the create leaves a job
# that only Together's list (by suffix) knows.
_CREATING: dict[str, list[str]] = {}
_REACH: dict[str, TogetherConfig] = {}  # job id -> the config its client was made from (base URL, key block)


class ProcessStopping(RuntimeError):
    """Raised instead of creating a job once this process was told to stop (`stop_chains_on_interrupt`)."""


class _Stop:
    """Whether this process is stopping, and whether its jobs are to be cancelled (a cancel or Ctrl-C) or
    left running for the next run (a shutdown); set once, by the main thread, read by every chain's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.why: str | None = None
        self.cancel = False

    def set(self, why: str, cancel: bool) -> None:
        with self.lock:
            self.why, self.cancel = why, self.cancel or cancel


_STOP = _Stop()


def refuse_if_stopping(what: str) -> None:
    """Raise `ProcessStopping` when this process is stopping: a thread must not create ``what`` then."""
    if _STOP.why is not None:
        raise ProcessStopping(f"not creating {what}: this process is stopping ({_STOP.why})")


def _current_run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None


def record_creating(suffix: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Before a create: record ``suffix`` on the current flow run (tag ``together-suffix:<suffix>``) and
    in this process, so that a cancel arriving while the create is in flight still finds its job."""
    run_id = _current_run_id()
    if run_id is None:
        return
    creating = _CREATING.setdefault(run_id, [])
    if suffix not in creating:
        creating.append(suffix)
    _tag_run(run_id, suffix_tag(suffix), log)


def _tag_run(run_id: str, tag: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    try:
        with get_client(sync_client=True) as prefect:
            run = prefect.read_flow_run(run_id)  # type: ignore[arg-type]
            if tag not in run.tags:
                prefect.update_flow_run(run.id, tags=[*run.tags, tag])
    except Exception as exc:  # the job must not be lost over a tag: the flow process still knows it
        log.warning(f"could not tag flow run {run_id} with {tag} ({exc}); job-reaper cannot see this job")


def _in_flight_jobs(client: Any, run_id: str | None, log: Any) -> list[str]:
    """Live jobs of the suffixes this run sent creates for that it never recorded (the reply was cut off)."""
    owned = set(_OWNED.get(run_id or "", []))
    found = []
    for suffix in _CREATING.get(run_id or "", []):
        try:
            job = api.find_job(client, suffix)
        except Exception as exc:
            log.error(f"could not look up the job of {suffix} ({exc}); job-reaper will")
            continue
        if job is None:
            log.warning(f"a create for {suffix} was in flight; if Together lists it later, job-reaper cancels it")
        elif job.id not in owned and job.status not in api.TERMINAL:
            found.append(job.id)
    return found


def record_job_owner(
    job_id: str, log: logging.Logger | logging.LoggerAdapter, together: TogetherConfig | None = None
) -> None:
    """Record ``job_id`` on the current flow run (tag ``together-job:<id>``) and in this process; a job
    recorded after this process was told to cancel its jobs (its create was in flight) is cancelled now."""
    if together is not None:
        _REACH[job_id] = together
        if _STOP.cancel:
            _cancel_live(together_client(together), [job_id], f"created while stopping ({_STOP.why})", log)
    run_id = _current_run_id()
    if run_id is None:
        return
    owned = _OWNED.setdefault(run_id, [])
    if job_id not in owned:
        owned.append(job_id)
    _tag_run(run_id, job_tag(job_id), log)


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


def _owners(prefect: Any, job_id: str, suffix: str | None = None) -> list[Owner]:
    """The runs that recorded ``job_id``; none, the runs that sent a create for its ``suffix``."""
    tags = [job_tag(job_id)] + ([suffix_tag(suffix)] if suffix else [])
    for tag in tags:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        if runs:
            return [Owner(str(r.id), r.created, r.state.type.value if r.state else None) for r in runs]
    return []


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
        log, client = get_run_logger(), together_client(together)
        owned = _OWNED.get(run_id or "", []) + _in_flight_jobs(client, run_id, log)
        _cancel_live(client, owned, "interrupted (Ctrl-C)", log)
        raise
    except TerminationSignal:
        # A worker's SIGTERM comes right after the run went Cancelling; any other SIGTERM (a shutdown, a
        # supervisor) leaves the job running for the next run to re-attach.
        log, client = get_run_logger(), together_client(together)
        try:
            with get_client(sync_client=True) as prefect:
                cancel_jobs_of_cancelled_runs(prefect, client, _OWNED.get(run_id or "", []), log)
            if _run_cancel_requested(run_id):  # a create cut off by the signal: this run is its only owner
                _cancel_live(client, _in_flight_jobs(client, run_id, log), "its flow run was cancelled", log)
        except Exception as exc:
            log.error(f"could not check whether this run was cancelled ({exc}); job-reaper will")
        raise


def _run_cancel_requested(run_id: str | None) -> bool:
    if run_id is None:
        return False
    with get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(run_id).state  # type: ignore[arg-type]
    return state is not None and state.type.value in ("CANCELLING", "CANCELLED")


def _stop_chains(why: str, cancel: bool, log: Any) -> list[str]:
    """Stop every chain of this process; with ``cancel``, cancel each live job any of its runs recorded."""
    _STOP.set(why, cancel)
    if not cancel:
        return []
    cancelled = []
    for job_id in [job_id for owned in list(_OWNED.values()) for job_id in owned]:
        reach = _REACH.get(job_id)
        if reach is None:  # recorded without its config: job-reaper finds it through the run's tag
            log.warning(f"Together job {job_id}: no client config in this process; job-reaper will cancel it")
            continue
        cancelled += _cancel_live(together_client(reach), [job_id], why, log)
    return cancelled


@contextlib.contextmanager
def stop_chains_on_interrupt() -> Iterator[None]:
    """Around a flow's wait for chains running in threads of this process (see the module's path 2)."""
    run_id = _current_run_id()
    try:
        yield
    except KeyboardInterrupt:
        _stop_chains("interrupted (Ctrl-C)", True, get_run_logger())
        raise
    except TerminationSignal:
        log = get_run_logger()
        try:
            cancel = _run_cancel_requested(run_id)
        except Exception as exc:  # no API: stop creating, leave the jobs to job-reaper and the next run
            log.error(f"could not check whether this run was cancelled ({exc}); job-reaper will")
            cancel = False
        _stop_chains("its run was cancelled" if cancel else "terminated", cancel, log)
        raise


@task(cache_policy=NO_CACHE, tags=[OpsConfig().together_api_tag])
def reap_cancelled_jobs(together: TogetherConfig) -> list[str]:
    """Cancel every live epochwise job at Together whose newest owning flow run was cancelled."""
    client = together_client(together)
    live = [j for j in api.list_jobs(client) if j.status not in api.TERMINAL and (j.suffix or "").startswith("ew-")]
    with get_client(sync_client=True) as prefect:
        wanted = [j.id for j in live if cancel_requested(_owners(prefect, j.id, j.suffix))]
    return _cancel_live(client, wanted, "its flow run was cancelled", get_run_logger())
