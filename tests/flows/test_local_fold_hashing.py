"""A local run hashes each fold file once: the epochs' cache keys, the task bodies, the trainer's run
directory and the report share one sha256 per file (counted at ``hashlib.sha256``, which still runs)."""

from __future__ import annotations

from pathlib import Path

from epochwise.config.train import TrainConfig
from epochwise.fold import Fold
from epochwise.local import keys
from flows.epoch_train import epoch_train
from tests.helpers import HYPER, FileHashCounter, local_config, make_fold


def test_a_two_epoch_run_hashes_each_fold_file_once(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "hashed", "hash-once", n_train=8, n_val=2)
    where = Fold.of(fold)
    hashes = FileHashCounter(monkeypatch, where.train, where.val)
    local = local_config(tmp_path)
    train = TrainConfig(backend="local", epochs=2, local_model="tiny", hyper=HYPER)
    records = epoch_train(str(fold), train=train, local=local)

    assert [r.epoch for r in records] == [1, 2]
    assert hashes.of(where.train) == 1 and hashes.of(where.val) == 1  # one pass per file for the whole run
    key = keys.run_key(fold, "tiny", HYPER, local)
    assert [r.model for r in records] == [str(keys.epoch_dir(fold, key, k)) for k in (1, 2)]

    hashes.reset()
    assert [r.model for r in epoch_train(str(fold), train=train, local=local)] == [r.model for r in records]
    assert hashes.of(where.train) == 1 and hashes.of(where.val) == 1  # the no-op rerun: one pass again
