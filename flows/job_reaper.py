"""``job-reaper``: cancel the Together jobs of cancelled ``epoch-train`` runs that are still running.

Cancelling a run normally cancels its job from the flow process or the flow's ``on_cancellation`` hook;
this flow is the backstop for when neither ran (a worker that skipped the hook or was lost, an API
outage at that moment). Each ``epoch-train`` run tags itself ``together-job:<id>`` for every job it
creates or re-attaches to; a live ``ew-`` job whose newest tagged run is Cancelling or Cancelled is
cancelled. A job of a Crashed run keeps running: the next run of the fold re-attaches to it.

Steps: Together's job list -> live epochwise jobs -> their owning flow runs -> cancel where the newest
owner was cancelled. Then Together's post-training model resources (GRPO): a live one that a run of this
project recorded (tag ``together-resource:<id>``) or that carries ``ew-`` sessions, and that no live flow
run owns, is stopped with ``stop?force=true`` (it bills per GPU-minute while READY).

    prefect deployment run job-reaper/frequent
"""

from __future__ import annotations

from prefect import flow

from epochwise.config.together import TogetherConfig
from tasks.cancellation import reap_cancelled_jobs
from tasks.post_training import reap_model_resources


@flow(name="job-reaper", log_prints=True, validate_parameters=True)
def job_reaper(together: TogetherConfig = TogetherConfig()) -> list[str]:
    """Cancel live epochwise jobs whose flow run was cancelled and stop model resources no live run owns;
    returns the job ids cancelled."""
    cancelled = reap_cancelled_jobs(together)
    print(f"cancelled {len(cancelled)} Together job(s) of cancelled flow runs")
    stopped = reap_model_resources(together)
    print(f"stopped {len(stopped)} post-training model resource(s) no live run owns")
    return cancelled
