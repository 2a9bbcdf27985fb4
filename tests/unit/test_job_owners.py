"""Which jobs a cancelled run leaves to cancel: the newest owning flow run decides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from epochwise.job_owners import Owner, cancel_requested, job_tag, tagged_jobs

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def owner(minutes: int, state: str | None) -> Owner:
    return Owner(f"run-{minutes}", T0 + timedelta(minutes=minutes), state)


def test_tags_round_trip_and_other_tags_are_ignored():
    tags = ["epochwise", "fold:games", job_tag("ft-1"), "together-job:", job_tag("ft-2")]
    assert tagged_jobs(tags) == ["ft-1", "ft-2"]


def test_a_cancelled_or_cancelling_newest_owner_cancels_the_job():
    assert cancel_requested([owner(0, "CANCELLED")])
    assert cancel_requested([owner(0, "CANCELLING")])
    assert cancel_requested([owner(0, "CRASHED"), owner(5, "CANCELLED")])


def test_a_crashed_running_or_unknown_newest_owner_keeps_the_job():
    assert not cancel_requested([owner(0, "CRASHED")])  # machine lost: the next run re-attaches
    assert not cancel_requested([owner(0, "CANCELLED"), owner(5, "RUNNING")])  # a newer run re-attached
    assert not cancel_requested([owner(0, "CANCELLED"), owner(5, "CRASHED")])
    assert not cancel_requested([owner(0, None)])
    assert not cancel_requested([])  # no known owner: never touched
