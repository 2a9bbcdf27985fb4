"""Output meant for people: sample replies, tables that keep whole ids when piped, no Prefect banner."""

from __future__ import annotations

import inspect
import io
import logging

from rich.console import Console
from rich.table import Table

from epochwise.cli import common
from epochwise.cli.local import reply_lines


def test_a_sample_reply_has_a_label_and_never_prints_as_blank_lines() -> None:
    assert reply_lines(3, "Describe chess", "\n" * 64) == [
        "epoch 3 reply to 'Describe chess':",
        "(no text: 64 whitespace character(s), " + repr("\n" * 40) + "...)",
    ]
    assert reply_lines(1, "p", "") == [
        "epoch 1 reply to 'p':",
        "(empty reply: the model generated only special tokens)",
    ]
    assert reply_lines(2, "p", "\n\nfirst\n\n\n\nsecond\n") == ["epoch 2 reply to 'p':", "first", "", "second"]
    assert reply_lines(2, "x" * 70, "ok")[0] == f"epoch 2 reply to {'x' * 60!r}...:"


def test_a_piped_table_keeps_long_ids_whole(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=out, width=80, highlight=False))
    model = "someone/Meta-Llama-3.1-8B-Instruct-Reference-ew-games-e1-0123456789abcdef-5b7a2c1d"
    table = Table(title="games")
    for column in ("epoch", "status", "model", "job"):
        table.add_column(column)
    table.add_row("1", "completed", model, "ft-0123456789abcdef0123456789")
    common.print_table(table)
    row = next(line for line in out.getvalue().splitlines() if "completed" in line)
    assert model in row and "ft-0123456789abcdef0123456789" in row and "…" not in out.getvalue()


def test_the_ephemeral_server_banner_is_dropped_and_nothing_else(caplog) -> None:
    from prefect.server.api.server import SubprocessASGIServer

    # The lines Prefect's own code logs on every ephemeral start and stop (checked in its source).
    source = inspect.getsource(SubprocessASGIServer)
    assert 'f"Starting temporary server on {self.address}' in source
    assert 'f"Stopping temporary server on {self.address}"' in source
    common.prefect_defaults()
    common.prefect_defaults()  # idempotent: one filter
    prefect_logger = logging.getLogger("prefect")
    assert sum(isinstance(f, common.HideTemporaryServerBanner) for f in prefect_logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="prefect"):
        prefect_logger.info("Starting temporary server on http://127.0.0.1:8123\nSee https://docs.prefect.io/v3/")
        prefect_logger.info("Stopping temporary server on http://127.0.0.1:8123")
        prefect_logger.info("Starting a flow run")
        logging.getLogger("prefect.flow_runs").info("Starting temporary server on (a run's own log line)")
    assert [r.getMessage() for r in caplog.records] == [
        "Starting a flow run",
        "Starting temporary server on (a run's own log line)",
    ]
