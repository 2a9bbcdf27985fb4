"""Presets and a records directory's own mapping through the real CLI, on the Prefect test harness:
``--preset quick_test`` trains the tiny model for one short epoch under its own run key, and
``prepare`` reads the mapping beside the records from any working directory (the user's file winning)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from epochwise.config import load_settings
from epochwise.config.presets import shipped_presets
from epochwise.local import keys
from tests.helpers import EXAMPLE_RECORDS, REPO, example_fold, records_dir, run_cli


def test_quick_test_trains_one_short_epoch_under_its_own_run_key(tmp_path: Path, monkeypatch, prefect_harness) -> None:
    fold = example_fold(tmp_path / "games")
    monkeypatch.setenv("EPOCHWISE_LOCAL__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EPOCHWISE_LOCAL__THREADS", "1")
    # No epochwise.yaml in the working directory: the shipped preset alone shapes the run.
    args = ["train", str(fold), "--backend", "local", "--preset", "quick_test"]
    code, screen = run_cli(args, prefect_harness, tmp_path)
    assert code == 0, "\n".join(screen)
    [run] = sorted((fold / "local").iterdir())
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("epoch-")) == ["epoch-1"]
    metrics = json.loads((run / "epoch-1" / keys.METRICS_FILE).read_bytes())
    assert metrics["steps"] == 10
    cut = load_settings(presets=[shipped_presets()["quick_test"]])
    assert run.name == keys.run_key(fold, "tiny", cut.train.hyper, cut.local)
    full = cut.local.model_copy(update={"max_steps": None})
    assert run.name != keys.run_key(fold, "tiny", cut.train.hyper, full)  # never a full run's adapters


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.jsonl"))}


def test_prepare_from_another_directory_uses_the_records_own_mapping(tmp_path: Path, prefect_harness) -> None:
    # The README's first command from the repository root, and the same records from a directory
    # without any epochwise.yaml: the mapping beside the records makes the same, valid fold.
    code, screen = run_cli(
        ["prepare", "examples/records/games", "--fold", str(tmp_path / "root")], prefect_harness, REPO
    )
    assert code == 0, "\n".join(screen)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, screen = run_cli(
        ["prepare", str(EXAMPLE_RECORDS), "--fold", str(tmp_path / "other")], prefect_harness, elsewhere
    )
    assert code == 0, "\n".join(screen)
    assert digest(tmp_path / "other") == digest(tmp_path / "root") == digest(example_fold(tmp_path / "lib"))
    assert len(digest(tmp_path / "root")) == 2 and any("skipped      │ 0" in line for line in screen)
    # One records file: the mapping beside it applies too.
    code, screen = run_cli(
        ["prepare", str(EXAMPLE_RECORDS / "nim.jsonl"), "--fold", str(tmp_path / "nim")], prefect_harness, elsewhere
    )
    assert code == 0 and any("skipped      │ 0" in line for line in screen), "\n".join(screen)


def test_the_users_config_file_wins_over_the_records_own_mapping(tmp_path: Path, prefect_harness) -> None:
    records = records_dir(tmp_path)
    (tmp_path / "mine.yaml").write_text("data:\n  mapping:\n    assistant_field: b\n")
    args = ["prepare", str(records), "--fold", str(tmp_path / "f"), "--config", str(tmp_path / "mine.yaml")]
    code, screen = run_cli(args, prefect_harness, tmp_path)
    assert code == 0, "\n".join(screen)
    rows = [
        json.loads(line)
        for name in ("train.jsonl", "val.jsonl")
        for line in (tmp_path / "f" / name).read_text().splitlines()
    ]
    assert len(rows) == 20
    # The file's assistant_field wins; the records' user_template, which the file leaves alone, still applies.
    assert all(r["messages"][-1]["content"].startswith("other ") for r in rows)
    assert all(r["messages"][0]["content"].startswith("Q: question ") for r in rows)
