"""A GRPO run killed while it drives an epoch's session, on a real ``prefect server start``: the epoch's
drive lease it held expires on the server (``together.fold_lease_s``, freed by the server's repossessor
service), and the rerun waits for that, then re-attaches to the session and applies no step twice.

The flow tests run on Prefect's test harness, whose server never expires a lease (they free a killed
run's leases by hand); this is the path those tests cannot show.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.e2e.processes import Prefect, tail
from tests.fake_together import post_training as fake_pt
from tests.fake_together.server import FakeTogether
from tests.flows.test_grpo_together import PT, epoch_sessions, grpo_cfg, grpo_fold
from tests.helpers import epoch_train_child

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
            deadline = time.monotonic() + HANG_S
            while pt.applied["optim-step"] < 2:
                assert first.poll() is None, tail(tmp_path / "first.log")
                assert time.monotonic() < deadline, "the first run never reached its held step"
                time.sleep(0.05)
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
