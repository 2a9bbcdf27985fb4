"""A server lease (`tasks.locks.server_lease`) stays held through a Prefect server outage longer than
Prefect's own renewal tolerates, and a holder whose lease the server reclaimed stops at its next check,
leaving the slot to the run that took it."""

from __future__ import annotations

import threading

import pytest
from prefect import get_client

from tasks.locks import LeaseLost, lease_limit_name, server_lease
from tests.helpers import wait_for
from tests.prefect_proxy import RENEW, Rule, api_proxy

LEASE_S = 60.0  # the shortest lease the server grants
RENEW_EVERY_S = 0.2  # in place of a third of LEASE_S, so that a test sees renewals within seconds


class Busy(Exception):
    pass


def active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(lease_limit_name(name)).active_slots


def reclaim(lease_id) -> None:
    """What the server's expired-lease sweep does to a lease its holder did not renew in time: revoke it
    and free its slot (the test harness's server runs no such sweep)."""
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id)


def test_a_lease_is_renewed_through_an_outage_that_outlasts_prefects_three_tries():
    """Prefect's renewal gives up after 3 failed tries, and the lease then expires under its holder."""
    name, failing = "test-lease-outage", 5
    outage = Rule("POST", RENEW, status=lambda n: 500 if n <= failing else None)  # a 500 is not resent by the client
    with api_proxy([outage]) as proxy:
        with server_lease(name, 30, LEASE_S, Busy(), renew_every_s=RENEW_EVERY_S) as held:
            wait_for(lambda: len(proxy.answered) > failing, "no renewal after the outage", timeout_s=60)
            assert [status for _, status in proxy.answered[:failing]] == [500] * failing
            assert 200 <= proxy.answered[failing][1] < 300  # the renewal after the outage held the lease
            assert not held.keeper.lost.is_set()
            held.check()  # still the holder: goes on
            assert active_slots(name) == 1
    assert active_slots(name) == 0


def test_a_holder_whose_lease_was_reclaimed_stops_at_its_next_check_and_leaves_the_slot_to_the_run_that_took_it():
    name = "test-lease-taken"
    rival_holds, rival_done = threading.Event(), threading.Event()

    def rival() -> None:
        with server_lease(name, 30, LEASE_S, Busy(), renew_every_s=RENEW_EVERY_S):
            rival_holds.set()
            rival_done.wait(60)

    with server_lease(name, 30, LEASE_S, Busy(), renew_every_s=RENEW_EVERY_S) as held:
        reclaim(held.keeper.lease_id)
        other = threading.Thread(target=rival)
        other.start()
        try:
            assert rival_holds.wait(30), "the rival never took the freed slot"
            wait_for(held.keeper.lost.is_set, "the keeper never saw its lease gone (410)", timeout_s=60)
            assert held.taken()  # by the rival
            with pytest.raises(LeaseLost, match="another run may hold it now"):
                held.check()
            assert active_slots(name) == 1  # the rival's, untouched by the holder that stopped
            held.check()  # raises once; the holder has stopped
        finally:
            rival_done.set()
            other.join()
    assert active_slots(name) == 0
