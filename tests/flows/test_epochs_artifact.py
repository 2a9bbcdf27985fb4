"""The ``<fold>-epochs`` artifact: `publish_epochs` writes it, `read_epochs` reads it back, and the
read without ``PREFECT_API_URL`` (one query on Prefect's database, no server started) returns exactly
what Prefect's API returns for the same database. Also what ``status`` and ``deploy-info`` print."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
from typer.testing import CliRunner

from epochwise.artifacts import (
    UnreadableDatabase,
    _artifact_data_from_server_models,
    artifact_data_from_api,
    artifact_data_from_database,
    artifact_key,
)
from epochwise.cli import app
from epochwise.epochs import EpochRecord, epoch_table, publish_epochs, read_epochs, records_from_table

MODEL = "someone/Meta-Llama-3.1-8B-Instruct-Reference-ew-{fold}-e{k}-0123456789abcdef-5b7a2c1d"


def together_records(fold: str, n: int) -> list[EpochRecord]:
    return [
        EpochRecord(
            fold=fold,
            epoch=k,
            backend="together",
            job_id=f"ft-{fold}-{k:02d}-0123456789abcdef",
            model=MODEL.format(fold=fold, k=k),
            train_loss=2.0 / k,
            val_loss=[1.5, 1.2, 1.3][k - 1],
        )
        for k in range(1, n + 1)
    ]


def local_records(fold: str) -> list[EpochRecord]:
    return [
        EpochRecord(
            fold=fold,
            epoch=k,
            backend="local",
            model=f"/runs/{fold}/local/abc/epoch-{k}",
            train_loss=6.3 - k / 10,
            val_loss=6.2 - k / 10,
        )
        for k in (1, 2)
    ]


@flow
def publish(fold: str, records: list[EpochRecord]) -> None:
    publish_epochs(fold, records)


def no_prefect_env(home: Path) -> dict[str, str]:
    """This process's environment with the harness's database but no API URL (the CLI's default mode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    return env


# What a CLI process does: run one command, then report whether an ephemeral server was ever created.
CLI = """
import sys
from epochwise.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    from prefect.server.api.server import SubprocessASGIServer
    print(f"servers: {len(SubprocessASGIServer._instances)}", file=sys.stderr)
"""


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_the_database_read_returns_what_the_api_returns() -> None:
    fold = "artifact-paths"
    key = artifact_key(fold, "epochs")
    assert artifact_data_from_api(key) is None
    assert artifact_data_from_database(key) is None
    publish(fold, together_records(fold, 2))
    publish(fold, together_records(fold, 3))  # a newer version of the key: the one both paths return
    api = artifact_data_from_api(key)
    assert api == epoch_table(together_records(fold, 3))
    assert artifact_data_from_database(key) == api
    assert _artifact_data_from_server_models(key) == api
    assert read_epochs(fold) == api
    back = records_from_table(fold, api)
    assert [(r.epoch, r.job_id, r.val_loss, r.backend) for r in back] == [
        (1, f"ft-{fold}-01-0123456789abcdef", 1.5, "together"),
        (2, f"ft-{fold}-02-0123456789abcdef", 1.2, "together"),
        (3, f"ft-{fold}-03-0123456789abcdef", 1.3, "together"),
    ]


def test_status_without_an_api_url_reads_the_database_and_starts_no_server(tmp_path: Path) -> None:
    fold = tmp_path / "status-db"
    fold.mkdir()
    publish(fold.name, together_records(fold.name, 2))
    expected = artifact_data_from_api(artifact_key(fold.name, "epochs"))
    done = run_cli(no_prefect_env(tmp_path / "home"), "status", str(fold), "--json")
    assert json.loads(done.stdout) == {"fold": fold.name, "epochs": expected}
    assert "servers: 0" in done.stderr
    assert "Starting temporary server" not in done.stderr


def test_a_new_prefect_home_has_no_epochs_and_is_not_created_by_reading(tmp_path: Path) -> None:
    fold = tmp_path / "games"
    fold.mkdir()
    env = no_prefect_env(tmp_path / "home")
    del env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]  # the default: $PREFECT_HOME/prefect.db
    done = run_cli(env, "status", str(fold))
    assert done.stdout.strip() == f"games: no epochs recorded yet (run `epochwise train {fold}`)"
    assert "servers: 0" in done.stderr
    assert not (tmp_path / "home" / "prefect.db").exists()


def test_a_database_without_prefect_tables_is_left_to_the_api(tmp_path: Path) -> None:
    empty = tmp_path / "prefect.db"
    sqlite3.connect(empty).close()
    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{empty}"}):
        with pytest.raises(UnreadableDatabase, match="no such table: artifact"):
            artifact_data_from_database("games-epochs")


def test_status_and_deploy_info_print_whole_ids_and_json(tmp_path: Path) -> None:
    fold = tmp_path / "print-together"
    fold.mkdir()
    publish(fold.name, together_records(fold.name, 3))
    result = CliRunner().invoke(app, ["status", str(fold)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and "…" not in result.output
    assert MODEL.format(fold=fold.name, k=2) in rows[1] and f"ft-{fold.name}-02-0123456789abcdef" in rows[1]

    result = CliRunner().invoke(app, ["deploy-info", str(fold)])
    assert result.exit_code == 0, result.output
    assert (
        f"deploy epoch 2: model {MODEL.format(fold=fold.name, k=2)} (job ft-{fold.name}-02-0123456789abcdef, "
        "val loss 1.2000)"
    ) in result.output.splitlines()
    result = CliRunner().invoke(app, ["deploy-info", str(fold), "--epoch", "3", "--json"])
    assert json.loads(result.output) == {"fold": fold.name, **epoch_table(together_records(fold.name, 3))[2]}


def test_deploy_info_of_a_local_fold_names_the_adapter_not_an_empty_job(tmp_path: Path) -> None:
    fold = tmp_path / "print-local"
    fold.mkdir()
    publish(fold.name, local_records(fold.name))
    result = CliRunner().invoke(app, ["deploy-info", str(fold)])
    assert result.exit_code == 0, result.output
    assert "(job ," not in result.output
    lines = result.output.splitlines()
    assert f"deploy epoch 2: local adapter /runs/{fold.name}/local/abc/epoch-2 (val loss 6.0000)" in lines
    assert f"next: epochwise deploy {fold} --epoch 2" in lines
