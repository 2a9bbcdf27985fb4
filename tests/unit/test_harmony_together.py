"""The Harmony parquet goes through the real together SDK to the fake Together server and is accepted."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from epochwise.config.data import DataConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.harmony import convert_fold
from epochwise.prepare import prepare
from epochwise.records import read_records
from tests.helpers import EXAMPLE_RECORDS, STORY


def test_parquet_upload_is_processed_to_completed(tmp_path: Path, together_client, fake_together) -> None:  # noqa: ANN001
    fold = tmp_path / "games"
    prepare(read_records(EXAMPLE_RECORDS).records, fold, DataConfig(mapping=STORY))
    summary = convert_fold(fold, HarmonyConfig(reasoning_effort="low"))
    statuses = {}
    for stats in summary.splits():
        uploaded = together_client.files.upload(file=Path(stats.output), purpose="fine-tune", check=True)
        status = uploaded.processing_status
        for _ in range(10):  # the fake answers PENDING for `file_polls` retrieves, then the final status
            if status != "PENDING":
                break
            status = together_client.files.retrieve(uploaded.id).processing_status
        statuses[Path(stats.output).name] = status
        stored = fake_together.state.files[uploaded.id]
        assert stored.file_type == "parquet"
        assert stored.nlines == stats.rows == pq.read_metadata(stats.output).num_rows
    assert statuses == {"train_harmony.parquet": "COMPLETED", "val_harmony.parquet": "COMPLETED"}
