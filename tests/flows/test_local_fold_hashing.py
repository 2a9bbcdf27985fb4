"""A local epoch hashes its fold once: the task's cache key, the task body and the trainer share one run key."""

from __future__ import annotations

from pathlib import Path

from epochwise.config.train import TrainConfig
from epochwise.local import keys
from flows.epoch_train import epoch_train
from tests.helpers import HYPER, local_config, make_fold


def test_each_epoch_hashes_the_fold_files_once(tmp_path: Path, monkeypatch):
    fold = make_fold(tmp_path, "hashed", "hash-once", n_train=8, n_val=2)
    hashed: list[str] = []
    real = keys.sha256_file

    def counting(path):  # calls the real hash; only counts which files were read
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(keys, "sha256_file", counting)
    local = local_config(tmp_path)
    records = epoch_train(
        str(fold), train=TrainConfig(backend="local", epochs=2, local_model="tiny", hyper=HYPER), local=local
    )

    assert [r.epoch for r in records] == [1, 2]
    assert hashed.count("train.jsonl") == 2 and hashed.count("val.jsonl") == 2  # one hash per epoch
    key = keys.run_key(fold, "tiny", HYPER, local)
    assert [r.model for r in records] == [str(keys.epoch_dir(fold, key, k)) for k in (1, 2)]
