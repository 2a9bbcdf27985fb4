"""Shared fixtures. Flow tests (tests/flows/) get a session-scoped Prefect test harness from
tests/flows/conftest.py; unit tests never start Prefect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.fake_together.fixtures"]

# Offline machine: no telemetry, a start-up timeout that survives 2 loaded cores, W&B never online.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("WANDB_MODE", "offline")
# Tests must never reach a real Together account, whatever the developer's shell holds.
os.environ.pop("TOGETHER_API_KEY", None)
os.environ.pop("TOGETHER_BASE_URL", None)

pytest.register_assert_rewrite("tests.helpers")  # its asserts explain themselves like a test's

from tests.helpers import EXAMPLE_RECORDS  # noqa: E402  (after the environment above is set)


@pytest.fixture
def example_records() -> Path:
    return EXAMPLE_RECORDS
