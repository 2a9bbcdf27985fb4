"""A session-scoped Prefect test harness (temporary SQLite API) with result storage in a temp dir.

The harness gives a temporary database but keeps the default result storage, so cache records would
otherwise leak between test sessions through ~/.prefect/storage.

Prefect sets up its console log handler when ``prefect.main`` is first imported, on the ``sys.stderr``
of that moment; imported here, it is the session's, not that of a ``CliRunner`` invocation that a test
file's first test may make (its stream is closed once the invocation ends, and later runs' log lines
then fail to write).
"""

from __future__ import annotations

import prefect.main  # noqa: F401  (see the module docstring)
import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(autouse=True, scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=90):
            yield storage
