"""A session-scoped Prefect test harness (temporary SQLite API) with result storage in a temp dir.

The harness gives a temporary database but keeps the default result storage, so cache records would
otherwise leak between test sessions through ~/.prefect/storage.
"""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(autouse=True, scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=90):
            yield storage
