"""A GRPO run killed while it drives an epoch's session, on a real ``prefect server start``: the epoch's
drive lease it held expires on the server (``together.fold_lease_s``, freed by the server's repossessor
service), and the rerun waits for that, then re-attaches to the session and applies no step twice. And a
driver that cannot reach the server for longer than its lease, while a run on another machine waits:
that run takes the lease and the session, and the driver stops without another operation.

The flow tests run on Prefect's test harness, whose server never expires a lease (they free a killed
run's leases by hand); this is the path those tests cannot show.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.e2e.processes import CuttableLink, Prefect, tail
from tests.fake_together import post_training as fake_pt
from tests.fake_together.server import FakeTogether
from tests.helpers import (
    HOSTS_PT,
    PT,
    epoch_sessions,
    epoch_train_child,
    grpo_cfg,
    grpo_fold,
    operation_posts,
    wait_for,
)

pytestmark = pytest.mark.e2e

LEASE_S = 60.0  # the shortest `together.fold_lease_s` allows
HANG_S = 300  # hang guard: the lease, the repossessor's 15 s loop and start-up on 2 loaded cores


def child_env(prefect: Prefect, fake: FakeTogether) -> dict[str, str]:
    """A flow process's environment: the real server's client settings and the fake Together."""
    return {
        **prefect.env,
        "TOGETHER_BASE_URL": fake.base_url,
        "TOGETHER_API_KEY": fake.api_key,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def test_a_killed_drivers_lease_expires_on_a_real_server_and_the_rerun_re_attaches(
    prefect_server: Prefect, tmp_path: Path
):
    fold, reward = grpo_fold(tmp_path, "gl", "lease", n_train=4)
    train, together = grpo_cfg(reward, epochs=1), PT.model_copy(update={"fold_lease_s": LEASE_S})
    with FakeTogether(api_key="fake-key-e2e-drive-lease") as fake:
        pt = fake_pt.state(fake)
        pt.script.hold_after = {"optim-step": 1}  # the 2nd (last) optim step is applied, then held
        env = child_env(prefect_server, fake)
        first = epoch_train_child(fold, 1, train, together, log=tmp_path / "first.log", env=env)
        try:
            wait_for(
                lambda: pt.applied["optim-step"] >= 2,
                "the first run never reached its held step",
                alive=[first],
                explain=lambda: tail(tmp_path / "first.log"),
                timeout_s=HANG_S,
            )
            time.sleep(0.2)  # it is polling the held operation, holding the epoch's drive lease
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            if first.poll() is None:
                first.kill()
        pt.script.hold_after = {}
        killed = time.monotonic()
        # the README's server settings keep leases in files, so a server restart would not orphan this one
        assert list((prefect_server.home / "concurrency_leases").glob("*.json"))

        rerun = epoch_train_child(fold, 1, train, together, log=tmp_path / "rerun.log", env=env)
        try:
            assert rerun.wait(timeout=HANG_S) == 0, tail(tmp_path / "rerun.log")
        finally:
            if rerun.poll() is None:
                rerun.kill()
        waited = time.monotonic() - killed
        log = (tmp_path / "rerun.log").read_text()
        print(f"rerun of a killed GRPO driver ended {waited:.0f} s after the kill (lease {LEASE_S:.0f} s)")

        assert "waiting for that run's epoch" in log  # the dead run's lease, still held
        assert "re-attaching to session" in log
        assert len(epoch_sessions(pt, "gl", 1)) == 1  # the killed run's session, not a second one
        assert pt.applied["optim-step"] == 2 and len(set(pt.applied_keys)) == len(pt.applied_keys)
        assert len(pt.resources) == 1 and pt.billing() == []


def wait_for_line(log: Path, line: str, *alive) -> None:
    wait_for(
        lambda: log.exists() and line in log.read_text(),
        f"{log.name} never logged {line!r}",
        alive=alive,
        explain=lambda: tail(log),
        timeout_s=HANG_S,
        every_s=0.1,
    )


def test_a_driver_cut_off_from_the_server_past_its_lease_stops_and_the_run_that_took_it_finishes(
    prefect_server: Prefect, tmp_path: Path
):
    """Machine A drives the epoch and loses its link to the server (not to Together) while its 2nd step
    is in flight; its lease expires there and machine B's run, waiting on it, takes it and re-attaches to
    A's session. A, no renewal of its lease confirmed for the lease's length, sends nothing more: it
    fails with a clear reason and leaves the resource to B, and B ends the epoch: one session, each step
    once, nothing billing."""
    fold, reward = grpo_fold(tmp_path, "gx", "cut", n_train=4)
    # HOSTS_PT: A polls its held step for minutes (the outage, B's start), not PT's 30 s
    train, together = grpo_cfg(reward, epochs=1), HOSTS_PT.model_copy(update={"fold_lease_s": LEASE_S})
    link = CuttableLink(int(prefect_server.url.rsplit(":", 1)[1]))
    logs = {"a": tmp_path / "machine-a.log", "b": tmp_path / "machine-b.log"}
    with FakeTogether(api_key="fake-key-e2e-cut-driver") as fake:
        pt = fake_pt.state(fake)
        pt.script.hold_after = {"optim-step": 1}  # A's 2nd (last) optim step is applied, then held
        env = child_env(prefect_server, fake)
        home_b = tmp_path / "machine-b"  # its own host locks and result storage, the same server
        env_b = {**env, "PREFECT_HOME": str(home_b), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home_b / "storage")}
        a = epoch_train_child(fold, 1, train, together, log=logs["a"], env={**env, "PREFECT_API_URL": link.api_url()})
        b = None
        try:
            wait_for(
                lambda: pt.applied["optim-step"] >= 2,
                "machine A never reached its held step",
                alive=[a],
                explain=lambda: tail(logs["a"]),
                timeout_s=HANG_S,
            )
            link.cut()
            cut = time.monotonic()
            b = epoch_train_child(fold, 1, train, together, log=logs["b"], env=env_b)
            wait_for_line(logs["b"], "re-attaching to session", a, b)
            took = time.monotonic() - cut
            posts_when_b_took = operation_posts(fake)
            # the step's optim-step ends for both; B, the lease's holder now, is held on the step's weights-sync
            pt.script.hold_after = {"weights-sync": 1}
            wait_for_line(logs["a"], "this run's lease expired", a, b)  # A, still cut off, stops before it
            link.mend()
            assert a.wait(timeout=HANG_S) != 0, tail(logs["a"])
            posts_when_a_stopped = operation_posts(fake)
            pt.script.hold_after = {}
            assert b.wait(timeout=HANG_S) == 0, tail(logs["b"])
        finally:
            for child in (a, b):
                if child is not None and child.poll() is None:
                    child.kill()
            link.close()
        print(f"machine B took the epoch {took:.0f} s after machine A lost the server (lease {LEASE_S:.0f} s)")
        log_a, log_b = logs["a"].read_text(), logs["b"].read_text()

        assert "waiting for that run's epoch" in log_b  # A's lease, held until it expired
        assert "another run may hold it now" in log_a and "left model resource" in log_a
        assert len(epoch_sessions(pt, "gx", 1)) == 1  # A's session, which B finished
        assert pt.applied["optim-step"] == 2 and len(set(pt.applied_keys)) == len(pt.applied_keys)
        print(
            f"operation POSTs: {posts_when_b_took} when B took over, {posts_when_a_stopped} when A stopped, "
            f"{operation_posts(fake)} in all; {len(pt.operations)} operations; applied {dict(pt.applied)}"
        )
        # after B took over, only B's POSTs: re-attached, it resends each applied operation with its key
        # (answered, not applied again) and sends the rest, one POST per operation of the epoch; A none
        assert operation_posts(fake) == posts_when_b_took + len(pt.operations)
        assert len(pt.resources) == 1 and pt.billing() == []  # B stopped the resource A left it
