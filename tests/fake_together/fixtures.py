"""pytest fixtures for the fake Together server (registered in tests/conftest.py).

``fake_together`` starts a fresh server per test and points the real SDK at it through the SDK's own
environment variables (``TOGETHER_BASE_URL`` without ``/v1``, and a dummy ``TOGETHER_API_KEY``), so the
code under test runs unchanged against it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_together.server import FakeTogether


@pytest.fixture
def fake_together(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTogether]:
    """A running `FakeTogether`; ``fake.base_url``, ``fake.api_key``, ``fake.state``, ``fake.counts``."""
    with FakeTogether(api_key="fake-key-" + "7f3a9c1e5b") as fake:
        monkeypatch.setenv("TOGETHER_BASE_URL", fake.base_url)
        monkeypatch.setenv("TOGETHER_API_KEY", fake.api_key)
        # httpx honours proxies from the environment; the fake is always reached directly.
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        yield fake


@pytest.fixture
def together_client(fake_together: FakeTogether):
    """The real ``together.Together`` client bound to the fake."""
    from together import Together

    return Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=3)
