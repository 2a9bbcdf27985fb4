"""User errors inside flows: a deployment run (no CLI in front) fails on them before doing any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blocks.credentials import MissingCredentials
from epochwise.config import TrainConfig
from flows.epoch_train import epoch_train


def test_together_without_a_key_fails_before_validation_or_conversion(tmp_path: Path) -> None:
    fold = tmp_path / "games"
    fold.mkdir()
    (fold / "train.jsonl").write_text('{"messages": []}\n', encoding="utf-8")  # validation would fail on it
    (fold / "val.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    state = epoch_train(str(fold), TrainConfig(backend="together", base_model="openai/gpt-oss-20b"), return_state=True)
    assert state.is_failed()
    with pytest.raises(MissingCredentials, match="no Together API key"):
        state.result()
    assert sorted(p.name for p in fold.iterdir()) == ["train.jsonl", "val.jsonl"]  # no harmony/ parquet
