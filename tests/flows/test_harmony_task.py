"""``convert_fold_to_harmony`` as a real Prefect task: it converts once, then reuses across flow runs."""

from __future__ import annotations

from pathlib import Path

import orjson
from prefect import flow

from epochwise.config.harmony import HarmonyConfig
from epochwise.problems import InputError
from tasks.harmony import convert_fold_to_harmony


@flow
def convert_twice(fold: str, config: HarmonyConfig) -> list[dict]:
    return [convert_fold_to_harmony(fold, config), convert_fold_to_harmony(fold, config)]


@flow
def convert_once(fold: str, config: HarmonyConfig) -> dict:
    return convert_fold_to_harmony(fold, config)


def write_fold(fold: Path) -> Path:
    fold.mkdir(parents=True)
    row = {"messages": [{"role": "user", "content": "Who wins?"}, {"role": "assistant", "content": "Kofi."}]}
    for name in ("train.jsonl", "val.jsonl"):
        (fold / name).write_bytes(orjson.dumps(row) + b"\n")
    return fold


def test_task_converts_then_reuses_in_a_new_flow_run(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "games")
    first, second = convert_twice(str(fold), HarmonyConfig(reasoning_effort="low"))
    assert (first["cached"], second["cached"]) == (False, True)
    assert Path(first["train"]).is_file() and Path(first["val"]).is_file()
    assert first["train"] == str((fold / "harmony" / "train_harmony.parquet").resolve())
    assert (first["rows"], first["key"]) == (2, second["key"])
    third = convert_once(str(fold), HarmonyConfig(reasoning_effort="low"))
    assert third["cached"] is True
    changed = convert_once(str(fold), HarmonyConfig(reasoning_effort="high"))
    assert changed["cached"] is False and changed["key"] != first["key"]


def test_task_fails_the_run_with_path_and_line(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "games")
    state = convert_once(str(fold), HarmonyConfig(max_seq_length=10), return_state=True)
    assert state.is_failed()
    try:
        state.result()
    except InputError as exc:
        assert str(exc.problems[0]).endswith("train.jsonl:1: " + exc.problems[0].reason)
        assert "over max_seq_length 10" in exc.problems[0].reason
    else:
        raise AssertionError("the failed run should raise InputError")
