"""Which Together jobs a cancelled flow run leaves behind: pure rules, no Prefect or network here.

Every flow run that creates or re-attaches to an epoch's job records the job id on itself as the tag
``together-job:<id>`` (right after the create call returned). A job's *owners* are the flow runs carrying
its tag; the newest owner decides its fate:

* newest owner Cancelling or Cancelled: the user asked to stop, so the job is cancelled at Together;
* newest owner Crashed (machine lost), Running, or anything else: the job runs on, and the next run of
  the fold re-attaches to it by its suffix;
* no owner known: left alone (another Prefect database's run, or one recorded before tagging existed).

A run also tags itself ``together-suffix:<suffix>`` just before it sends a create: a job whose create
reply never reached the run (a cancel or Ctrl-C while the create was in flight) has no job tag, and its
owners are then the runs carrying its suffix's tag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

JOB_TAG = "together-job:"
SUFFIX_TAG = "together-suffix:"
CANCEL_STATES = ("CANCELLING", "CANCELLED")


def job_tag(job_id: str) -> str:
    """The flow-run tag recording that the run owns ``job_id``."""
    return JOB_TAG + job_id


def suffix_tag(suffix: str) -> str:
    """The flow-run tag recording that the run sent a create for the job with ``suffix``."""
    return SUFFIX_TAG + suffix


def tagged_jobs(tags: Iterable[str]) -> list[str]:
    """The job ids recorded in a flow run's tags, in tag order."""
    return [tag[len(JOB_TAG) :] for tag in tags if tag.startswith(JOB_TAG) and len(tag) > len(JOB_TAG)]


@dataclass(frozen=True)
class Owner:
    """A flow run that recorded a job: its id, when it was created and its state type (``CANCELLED``...)."""

    flow_run_id: str
    created: datetime
    state_type: str | None


def cancel_requested(owners: Iterable[Owner]) -> bool:
    """Whether the job's newest owner was cancelled (or is being cancelled)."""
    newest = max(owners, key=lambda owner: owner.created, default=None)
    return newest is not None and (newest.state_type or "").upper() in CANCEL_STATES
