"""Local backend: content keys, schedule shape, accumulation, lazy torch imports, W&B offline adapter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from epochwise.config.local import LocalConfig
from epochwise.config.train import HyperParams
from epochwise.local import keys

REPO = Path(__file__).resolve().parents[2]


def write_fold(path: Path, train: str = '{"messages": []}\n') -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text(train)
    (path / "val.jsonl").write_text('{"messages": [1]}\n')
    return path


def test_run_key_follows_content_not_paths_or_speed_knobs(tmp_path: Path):
    a, b = write_fold(tmp_path / "a"), write_fold(tmp_path / "b")
    hyper, local = HyperParams(), LocalConfig()
    key = keys.run_key(a, "tiny", hyper, local)
    assert keys.run_key(b, "tiny", hyper, local) == key  # same bytes elsewhere
    assert keys.run_key(a, "tiny", hyper, LocalConfig(threads=1, checkpoint_every=5, cache_dir=tmp_path)) == key
    changed = [
        keys.run_key(write_fold(tmp_path / "c", train='{"messages": [0]}\n'), "tiny", hyper, local),
        keys.run_key(a, "smollm2", hyper, local),
        keys.run_key(a, "tiny", HyperParams(learning_rate=1e-3), local),
        keys.run_key(a, "tiny", hyper, LocalConfig(seq_length=128)),
        keys.run_key(a, "tiny", hyper, LocalConfig(packing=False)),
    ]
    assert len({key, *changed}) == 6


def test_a_model_directory_is_keyed_by_its_files_however_it_is_named(tmp_path: Path, monkeypatch):
    fold = write_fold(tmp_path / "f")
    hyper, local = HyperParams(), LocalConfig()
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"a" * 8)
    key = keys.run_key(fold, str(model), hyper, local)
    monkeypatch.chdir(tmp_path)
    assert keys.run_key(fold, "./my-model", hyper, local) == key
    assert keys.run_key(fold, "my-model", hyper, local) == key  # an existing directory wins over a hub id
    assert keys.run_key(fold, "org/my-model", hyper, local) != key
    assert keys.model_identity("org/my-model") == "org/my-model"  # hub ids and built models: their names
    assert keys.model_identity("tiny") == "tiny" and keys.local_model_dir("smollm2") is None

    weights.write_bytes(b"b" * 9)  # new weights in place: a new run directory, not the old adapters
    resized = keys.run_key(fold, "./my-model", hyper, local)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, rewritten later
    touched = keys.run_key(fold, "./my-model", hyper, local)
    (model / "tokenizer.json").write_text("{}")
    added = keys.run_key(fold, "./my-model", hyper, local)
    assert len({key, resized, touched, added}) == 4


@pytest.mark.parametrize("name", ["./missing", "../missing", "/no/such/model", "~/no-such-model-dir"])
def test_a_missing_model_path_is_a_clear_error_not_a_hub_lookup(tmp_path: Path, name: str):
    fold = write_fold(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(name)}: no such model directory"):
        keys.run_key(fold, name, HyperParams(), LocalConfig())


def test_cli_train_reports_a_missing_model_directory_before_prefect_starts(tmp_path: Path):
    from typer.testing import CliRunner

    from epochwise.cli import app

    row = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    fold = write_fold(tmp_path / "games", train=row)
    (fold / "val.jsonl").write_text(row)
    result = CliRunner().invoke(app, ["train", str(fold), "--backend", "local", "--model", "./missing-model"])
    assert result.exit_code == 1
    assert "error: ./missing-model: no such model directory" in result.output
    assert not (fold / "local").exists()


def finish(fold: Path, epoch: int, parent: str | None, stamp: str = "t1") -> None:
    """Write the metrics.json a finished epoch leaves behind."""
    directory = keys.epoch_dir(fold, keys.run_key(fold, "tiny", HyperParams(), LocalConfig()), epoch)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / keys.METRICS_FILE).write_text(json.dumps({"parent": parent, "finished_at": stamp}))


def test_epoch_cache_key_exists_only_for_finished_epochs_and_follows_them(tmp_path: Path):
    fold = write_fold(tmp_path / "f")
    hyper, local = HyperParams(), LocalConfig()
    assert keys.epoch_cache_key(fold, 1, "tiny", hyper, local, None) is None  # nothing to skip yet
    finish(fold, 1, None)
    first = keys.epoch_cache_key(fold, 1, "tiny", hyper, local, None)
    assert first.startswith("local-epoch-") and first == keys.epoch_cache_key(fold, 1, "tiny", hyper, local, None)
    assert keys.epoch_cache_key(fold, 1, "tiny", hyper, local, "/elsewhere/epoch-3") is None  # other parent
    finish(fold, 2, "p")
    second = keys.epoch_cache_key(fold, 2, "tiny", hyper, local, "p")
    finish(fold, 1, None, stamp="t2")  # epoch 1 trained again: its old cache record must not be used
    retrained = keys.epoch_cache_key(fold, 1, "tiny", hyper, local, None)
    assert len({first, second, retrained}) == 3


def test_missing_fold_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"train.jsonl: not found \(run `epochwise prepare` first\)"):
        keys.fold_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"harmony/train_harmony.parquet: not found"):
        keys.fold_files(tmp_path, "harmony")


def test_schedule_warmup_then_cosine_to_min_ratio():
    from epochwise.local.trainer import lr_lambda

    factor = lr_lambda(HyperParams(lr_scheduler="cosine", warmup_ratio=0.2, min_lr_ratio=0.1), total_steps=10)
    values = [factor(s) for s in range(10)]
    assert values[0] < values[1] < values[2] == 1.0  # 2 warmup steps, then the peak
    assert all(a > b for a, b in zip(values[2:], values[3:], strict=False))
    assert factor(10) == pytest.approx(0.1)
    constant = lr_lambda(HyperParams(), total_steps=10)  # shared default: linear with min ratio 1.0
    assert {constant(s) for s in range(11)} == {1.0}
    linear = lr_lambda(HyperParams(min_lr_ratio=0.0), total_steps=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_integer_batch_size_sets_accumulation():
    from epochwise.local.trainer import grad_accumulation

    assert grad_accumulation(HyperParams(), LocalConfig(grad_accumulation=3)) == 3
    assert grad_accumulation(HyperParams(batch_size=16), LocalConfig(micro_batch_size=4)) == 4


def test_importing_flows_and_tasks_does_not_import_torch():
    code = (
        "import sys, flows.epoch_train, tasks.local_train, epochwise.local.keys, epochwise.cli; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_wandb_offline_run_is_grouped_by_fold(tmp_path: Path, monkeypatch):
    from epochwise.wandb_log import start_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = start_run("epochwise-test", "games", 2, "abc123", {"learning_rate": 1e-4}, directory=tmp_path)
    assert run.run.group == "games" and run.run.id == "games-abc123-e2"
    for step in (1, 2):
        run.log_step(step, {"train/loss": 1.0 / step})
    run.finish({"val/loss": 0.5, "tokens_per_s": None})
    runs = list((tmp_path / "wandb").glob("offline-run-*-games-abc123-e2"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())


def test_the_cache_key_from_a_computed_run_key_is_the_same_value(tmp_path: Path):
    fold = write_fold(tmp_path / "f")
    hyper, local = HyperParams(), LocalConfig()
    key = keys.run_key(fold, "tiny", hyper, local)
    assert keys.run_epoch_cache_key(fold, key, 1, None) is None
    finish(fold, 1, None)
    assert keys.run_epoch_cache_key(fold, key, 1, None) == keys.epoch_cache_key(fold, 1, "tiny", hyper, local, None)
