"""Names of the Prefect artifacts epochwise publishes (keys: lowercase letters, digits and dashes)."""

from __future__ import annotations

import json
import re
from contextlib import closing
from pathlib import Path
from typing import Any


def artifact_key(fold: str, kind: str) -> str:
    """``<fold>-<kind>``, e.g. ``games-epochs``; other characters become dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{fold}-{kind}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", slug)


def latest_artifact_data(key: str) -> object | None:
    """The ``data`` of the latest artifact with ``key`` (JSON decoded), or None when there is none.

    With ``PREFECT_API_URL`` set this asks that API. Without it, Prefect would boot its ephemeral
    server (8-14 s) just to answer one query, so instead the same query runs in this process on the
    database that server would open (`artifact_data_from_database`): one read, nothing started.
    A database that the read cannot use (e.g. one never migrated to this Prefect's schema) is left to
    the API path, which migrates it first.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return artifact_data_from_api(key)
    try:
        return artifact_data_from_database(key)
    except UnreadableDatabase:
        return artifact_data_from_api(key)


class UnreadableDatabase(Exception):
    """Prefect's database exists but this process cannot read the artifact table from it."""


def artifact_data_from_api(key: str) -> object | None:
    """``Artifact.get(key).data`` through Prefect's client (starts the ephemeral server when needed)."""
    from prefect.artifacts import Artifact

    artifact = Artifact.get(key)
    return None if artifact is None else _decoded(artifact.data)


def artifact_data_from_database(key: str) -> object | None:
    """What ``Artifact.get(key)`` returns, read straight from Prefect's database.

    ``Artifact.get`` posts ``/artifacts/filter`` (key filter, latest ``updated`` first, limit 1), which
    the server answers with one ``SELECT ... FROM artifact WHERE key IN (...) ORDER BY updated DESC
    LIMIT 1``. SQLite (the default, ``$PREFECT_HOME/prefect.db``) gets that statement through the
    standard library on a read-only connection (importing Prefect's server package alone costs
    seconds); any other database runs Prefect's own server-side query in-process. A database file
    that does not exist yet holds no artifact, and reading never creates it.
    """
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
    from sqlalchemy.engine import make_url

    url = make_url(PREFECT_API_DATABASE_CONNECTION_URL.value())
    if url.get_backend_name() == "sqlite" and url.database and ":memory:" not in url.database:
        import sqlite3

        path = Path(url.database).expanduser()
        if not path.exists():
            return None
        try:
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                row = db.execute(
                    "SELECT data FROM artifact WHERE key IN (?) ORDER BY updated DESC LIMIT 1", (key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise UnreadableDatabase(f"{path}: {exc}") from exc
        return None if row is None or row[0] is None else _decoded(json.loads(row[0]))
    return _artifact_data_from_server_models(key)


def _artifact_data_from_server_models(key: str) -> object | None:
    """The same query through Prefect's server-side model (``read_artifacts``) and database interface."""
    import asyncio

    import sqlalchemy.exc
    from prefect.server.database import provide_database_interface
    from prefect.server.models.artifacts import read_artifacts
    from prefect.server.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.server.schemas.sorting import ArtifactSort

    db = provide_database_interface()

    async def query() -> object | None:
        async with db.session_context() as session:
            found = await read_artifacts(
                session=session,
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.UPDATED_DESC,
                limit=1,
            )
            return _decoded(found[0].data) if found else None

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        runner = asyncio.run
    else:  # called from async code: its own loop, in its own thread
        from concurrent.futures import ThreadPoolExecutor

        def runner(coro: Any) -> Any:
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, coro).result()

    try:
        return runner(query())
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise UnreadableDatabase(str(exc)) from exc


def _decoded(data: object) -> object:
    return json.loads(data) if isinstance(data, str) else data
