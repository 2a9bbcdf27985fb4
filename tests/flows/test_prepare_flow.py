"""The ``prepare-fold`` flow on Prefect's test harness, and the ``epochwise`` CLI around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config import load_settings
from epochwise.fold import TRAIN_FILE, VAL_FILE
from epochwise.problems import InputError
from flows.prepare_fold import prepare_fold
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
GAMES_MAPPING = REPO / "examples" / "records" / "games" / "epochwise.yaml"
GAMES_DATA = load_settings(REPO / "epochwise.yaml", records_file=GAMES_MAPPING).data


def test_flow_writes_fold_and_publishes_summary(tmp_path: Path, example_records: Path) -> None:
    fold = tmp_path / "games"
    summary = prepare_fold(str(example_records), str(fold), GAMES_DATA)
    assert summary.records_read == 360 and (summary.train_written, summary.val_written) == (324, 36)
    assert len((fold / TRAIN_FILE).read_text().splitlines()) == 324

    async def latest_artifact():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["games-prepare"]))
            )
            return found[-1]

    import asyncio

    artifact = asyncio.run(latest_artifact())
    assert artifact.type == "table"
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert rows[0]["records read"] == 360


def test_flow_fails_on_bad_records_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "records"
    src.mkdir()
    (src / "r.jsonl").write_text('{"story": "a", "context": "x"}\n{oops\n', encoding="utf-8")
    state = prepare_fold(str(src), str(tmp_path / "fold"), GAMES_DATA, return_state=True)
    assert state.is_failed()
    try:
        state.result()
    except InputError as exc:
        assert [(Path(p.path).name, p.line) for p in exc.problems] == [("r.jsonl", 2)]
    else:  # pragma: no cover - the assertion above must run
        raise AssertionError("expected InputError")
    assert not (tmp_path / "fold").exists()


def test_cli_prepare_then_validate(tmp_path: Path, example_records: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # picks up ./epochwise.yaml like a user in the repository would
    fold = tmp_path / "folds" / "games"
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", str(example_records), "--fold", str(fold), "--val-ratio", "0.2"])
    assert result.exit_code == 0, result.output
    assert "records read" in result.output and "288" in result.output and "72" in result.output
    result = runner.invoke(app, ["validate", str(fold / TRAIN_FILE), str(fold / VAL_FILE)])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok") == 2


def test_cli_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    src = tmp_path / "records"
    src.mkdir()
    (src / "r.jsonl").write_bytes(b'{"story": "a", "context": "x"}\n[1]\n{"story": "caf\xe9"}\n')
    result = CliRunner().invoke(app, ["prepare", str(src), "--fold", str(tmp_path / "fold")])
    assert result.exit_code == 1
    assert "r.jsonl:2: expected a JSON object, got an array" in result.output
    assert "r.jsonl:3: not valid UTF-8" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "fold").exists()


def test_cli_validate_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "train.jsonl:1: no assistant message" in result.output


# --- bad input through the installed CLI in its own process: reasons on screen, traceback in the run log


def run_log(fold: Path) -> list[str]:
    """Every log message Prefect's API holds for the prepare-fold run that wrote to ``fold``."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="")))
            (run,) = [r for r in runs if r.parameters.get("fold") == str(fold)]
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return [log.message for log in logs]

    import asyncio

    return asyncio.run(read())


def test_cli_records_that_cannot_make_a_fold_print_only_the_reason(tmp_path: Path, prefect_harness: Path) -> None:
    src = tmp_path / "one.jsonl"
    src.write_text('{"story": "a", "context": "x"}\n', encoding="utf-8")
    shutil.copy(GAMES_MAPPING, tmp_path / "epochwise.yaml")  # the games records' mapping, beside them
    fold = tmp_path / "fold"
    code, screen = run_cli(["prepare", str(src), "--fold", str(fold)], prefect_harness, REPO)
    assert code == 1
    shown = "\n".join(screen)
    assert "Traceback" not in shown and "| ERROR" not in shown
    assert "InputError" not in shown and "Failed(" not in shown  # nor Prefect's failure-state lines
    assert [line for line in screen if "| INFO" not in line] == [
        f"{fold}: validation split is empty: need at least 2 records and val_ratio > 0",
        "1 problem(s) found",
    ]
    assert not fold.exists()
    # The run log in Prefect's API (what the UI shows) keeps the full traceback of the task and the flow.
    tracebacks = [m for m in run_log(fold) if "Traceback (most recent call last)" in m and "InputError" in m]
    assert len(tracebacks) == 2


def test_cli_strict_with_an_unmappable_record_prints_only_the_reason(tmp_path: Path, prefect_harness: Path) -> None:
    src = tmp_path / "records"
    src.mkdir()
    (src / "r.jsonl").write_text(
        '{"story": "a", "context": {"x": 1}}\n{"context": {"x": 2}}\n{"story": "c", "context": {"x": 3}}\n',
        encoding="utf-8",
    )
    shutil.copy(GAMES_MAPPING, src / "epochwise.yaml")
    fold = tmp_path / "fold"
    code, screen = run_cli(["prepare", str(src), "--fold", str(fold), "--strict"], prefect_harness, REPO)
    assert code == 1
    shown = "\n".join(screen)
    assert "Traceback" not in shown and "InputError" not in shown and "Failed(" not in shown
    assert [line for line in screen if "| INFO" not in line] == [
        f"{src / 'r.jsonl'}:2: missing field 'story' used by the user template",
        "1 problem(s) found",
    ]
    assert not fold.exists()
