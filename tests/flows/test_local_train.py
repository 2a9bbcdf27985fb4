"""The local backend end to end on the Prefect test harness: 2 epochs through ``epoch-train``, the
cache across flow runs, a SIGKILLed run resuming from its checkpoint, export and sample commands."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from prefect import flow
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config.train import TrainConfig
from epochwise.local import keys
from flows.epoch_train import epoch_train
from tasks.local_train import train_local_epoch
from tests.helpers import HYPER, REPO, example_fold, local_config, resume_config, wait_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The example fold after a 2-epoch local ``epoch-train`` run with W&B in offline mode."""
    root = tmp_path_factory.mktemp("local")
    fold = example_fold(root / "games")
    local = local_config(root)
    train = TrainConfig(backend="local", epochs=2, local_model="tiny", hyper=HYPER, wandb_project="epochwise-test")
    assert os.environ["WANDB_MODE"] == "offline"
    records = epoch_train(str(fold), train=train, local=local)
    return fold, train, local, records


def test_two_local_epochs_train_and_save_loadable_adapters(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fold, train, local, records = trained
    assert [(r.epoch, r.backend, r.status) for r in records] == [(1, "local", "completed"), (2, "local", "completed")]
    first, second = records
    assert first.parent == "tiny" and second.parent == first.model
    key = keys.run_key(fold, "tiny", train.hyper, local)
    assert [r.model for r in records] == [str(keys.epoch_dir(fold, key, k)) for k in (1, 2)]
    assert second.val_loss < first.val_loss and second.train_loss < first.train_loss
    assert all(r.tokens_per_s > 0 and isinstance(r.sample, str) for r in records)
    for record in records:
        adapter = Path(record.model)
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
        assert not keys.checkpoint_path(fold, key, record.epoch).exists()  # removed once the epoch is done
        metrics = orjson.loads((adapter / keys.METRICS_FILE).read_bytes())
        base = AutoModelForCausalLM.from_pretrained(metrics["base_model"])
        model = PeftModel.from_pretrained(base, adapter)
        assert any("lora_A" in name for name, _ in model.named_parameters())
    # the loss of epoch 1's steps goes down within the epoch as well
    steps = orjson.loads((Path(first.model) / keys.METRICS_FILE).read_bytes())["step_losses"]
    assert sum(steps[-5:]) < sum(steps[:5])
    # one offline W&B run per epoch, grouped by fold
    runs = sorted((fold / "local" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2


def test_rerun_skips_finished_epochs_and_never_returns_a_deleted_adapter(trained):
    fold, train, local, records = trained
    metrics = Path(records[1].model) / keys.METRICS_FILE

    @flow
    def rerun_epoch_two():
        return train_local_epoch(str(fold), 2, train, local, records[0].model, return_state=True)

    first = rerun_epoch_two()  # found finished on disk: returned without training
    assert first.is_completed() and first.result() == records[1]
    assert orjson.loads(metrics.read_bytes())["finished_at"] == records[1].finished_at.isoformat()
    second = rerun_epoch_two()  # now keyed on the finished files: a Prefect cache hit
    assert second.name == "Cached" and second.result() == records[1]

    shutil.rmtree(records[1].model)  # a cached result must not stand in for a deleted adapter
    again = rerun_epoch_two()
    assert again.name == "Completed" and (Path(records[1].model) / "adapter_model.safetensors").is_file()
    assert again.result().finished_at > records[1].finished_at
    assert again.result().val_loss == pytest.approx(records[1].val_loss, rel=1e-6)  # same seed + data


def test_export_merged_and_adapter_and_sample(trained, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    fold, _, _, records = trained
    runner = CliRunner()
    merged = runner.invoke(app, ["export", str(fold), "--epoch", "best", "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert "epoch 2" in merged.output  # epoch 2 has the lower validation loss
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
    adapter = runner.invoke(app, ["export", str(fold), "--epoch", "1", "--adapter", "--out", str(tmp_path / "a")])
    assert adapter.exit_code == 0, adapter.output
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        Path(records[0].model) / "adapter_model.safetensors"
    ).read_bytes()
    sample = runner.invoke(app, ["sample", str(fold), "--epoch", "2", "--prompt", "Who wins?", "--max-new-tokens", "4"])
    assert sample.exit_code == 0, sample.output
    label, *reply = sample.output.splitlines()
    assert label == "epoch 2 reply to 'Who wins?':" and reply and reply[0].strip()
    missing = runner.invoke(app, ["sample", str(fold), "--epoch", "7", "--prompt", "x"])
    assert missing.exit_code == 1 and "epoch 7 is not finished (finished: 1, 2)" in missing.output


def test_a_model_directory_trains_offline_and_new_weights_train_anew(trained, tmp_path: Path):
    """``--model <directory>``: a saved HF model trains like a hub id, with no hub; its adapter records
    the directory, a rerun skips the epoch, and weights replaced in place train again."""
    import torch
    from transformers import AutoModelForCausalLM

    _, _, local, records = trained
    model_dir = tmp_path / "my-model"
    shutil.copytree(orjson.loads((Path(records[0].model) / keys.METRICS_FILE).read_bytes())["base_model"], model_dir)
    fold = example_fold(tmp_path / "games")  # its own fold: the fixture's run stays as it is
    train = TrainConfig(backend="local", epochs=1, local_model=str(model_dir), hyper=HYPER)

    [first] = epoch_train(str(fold), train=train, local=local)
    adapter_config = orjson.loads((Path(first.model) / "adapter_config.json").read_bytes())
    assert adapter_config["base_model_name_or_path"] == str(model_dir.resolve())
    assert first.parent == str(model_dir) and first.val_loss is not None
    [again] = epoch_train(str(fold), train=train, local=local)
    assert (again.model, again.finished_at) == (first.model, first.finished_at)  # skipped, not retrained

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    model.save_pretrained(model_dir)
    [retrained] = epoch_train(str(fold), train=train, local=local)
    assert retrained.model != first.model and retrained.val_loss != first.val_loss
    assert Path(first.model, "adapter_model.safetensors").is_file()  # the old base's adapter is kept


CHILD = """
import sys
import time
from pathlib import Path
from epochwise.local.trainer import train_epoch
from tests.helpers import HYPER, resume_config

def on_step(step, total, loss):
    print(step, total, loss, flush=True)

train_epoch(sys.argv[1], 1, "tiny", HYPER, resume_config(Path(sys.argv[2])), None, on_step)
"""


def test_sigkilled_run_resumes_from_its_checkpoint(tmp_path: Path):
    fold = example_fold(tmp_path / "killed" / "games")
    reference_fold = tmp_path / "reference" / "games"
    shutil.copytree(fold, reference_fold)
    local = resume_config(tmp_path)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fold), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    key = keys.run_key(fold, "tiny", HYPER, local)
    checkpoint = keys.checkpoint_path(fold, key, 1)
    seen = []
    for line in child.stdout:
        step, total, _ = line.split()
        seen.append(int(step))
        if int(step) >= 7:  # checkpoints were written after steps 3 and 6
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert int(total) > 20 and seen[-1] < int(total)  # killed mid-epoch
    assert checkpoint.is_file() and not keys.epoch_dir(fold, key, 1).exists()

    @flow
    def rerun():
        return train_local_epoch(str(fold), 1, TrainConfig(local_model="tiny", hyper=HYPER), local, None)

    record = rerun()
    metrics = orjson.loads((Path(record.model) / keys.METRICS_FILE).read_bytes())
    # the last checkpoint before the kill (every 3 steps, at least the one after step 6), not step 0
    assert metrics["resumed_from_step"] >= 6 and metrics["resumed_from_step"] % 3 == 0
    assert metrics["steps"] == int(total) and len(metrics["step_losses"]) == int(total)
    assert not checkpoint.exists()

    # An uninterrupted run on identical data: same seed + data -> the same losses, step by step,
    # so the resumed run continued the loss curve instead of restarting it.
    from epochwise.local.trainer import train_epoch

    reference = train_epoch(reference_fold, 1, "tiny", HYPER, local, None)
    assert reference.resumed_from_step == 0
    assert metrics["step_losses"] == pytest.approx(reference.step_losses, rel=1e-6, abs=1e-7)
    assert metrics["val_loss"] == pytest.approx(reference.val_loss, rel=1e-6)


def test_resume_keeps_the_thread_count_of_the_killed_run(tmp_path: Path):
    """With ``local.threads`` unset, a resumed epoch runs with its checkpoint's thread count (not
    today's idle cores), so its losses match an uninterrupted run with that count bit for bit."""
    from epochwise.local.trainer import train_epoch

    full = example_fold(tmp_path / "full" / "games")
    fold = tmp_path / "killed" / "games"
    fold.mkdir(parents=True)
    for name in ("train.jsonl", "val.jsonl"):  # 12 one-row steps are enough here
        (fold / name).write_text("".join((full / name).read_text().splitlines(keepends=True)[:12]))
    reference_fold = tmp_path / "reference" / "games"
    shutil.copytree(fold, reference_fold)
    pinned = resume_config(tmp_path).model_copy(update={"threads": 3})  # more than this machine's cores

    class Killed(Exception):
        pass

    def stop_after_step_4(step: int, total: int, loss: float) -> None:
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train_epoch(fold, 1, "tiny", HYPER, pinned, None, on_step=stop_after_step_4)
    unpinned = pinned.model_copy(update={"threads": None})
    resumed = train_epoch(fold, 1, "tiny", HYPER, unpinned, None)
    assert resumed.resumed_from_step == 3 and resumed.threads == 3
    reference = train_epoch(reference_fold, 1, "tiny", HYPER, pinned, None)
    assert reference.threads == 3 and reference.resumed_from_step == 0
    assert resumed.step_losses == reference.step_losses


FLOW_CHILD = """
import sys
import time
from pathlib import Path
from flows.epoch_train import epoch_train
from epochwise.config.train import TrainConfig
from tests.helpers import HYPER, resume_config

epoch_train(sys.argv[1], TrainConfig(backend="local", epochs=1, local_model="tiny", hyper=HYPER),
            local=resume_config(Path(sys.argv[2])))
"""


def test_a_cancelled_local_run_keeps_its_last_checkpoint_and_the_rerun_resumes(tmp_path: Path):
    """A cancel reaches a local run as the worker's SIGTERM (Prefect raises it in the flow): training
    stops, the last checkpoint stays, and the next run continues from it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH
    from prefect.states import Cancelling

    fold = example_fold(tmp_path / "cancelled" / "games")
    local = resume_config(tmp_path)
    checkpoint = keys.checkpoint_path(fold, keys.run_key(fold, "tiny", HYPER, local), 1)
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": str(REPO),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", FLOW_CHILD, str(fold), str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(checkpoint.is_file, "no checkpoint written", alive=[child])
        with get_client(sync_client=True) as prefect:  # what `prefect flow-run cancel` does first
            [run] = [
                r
                for r in prefect.read_flow_runs()
                if r.state and r.state.is_running() and r.parameters.get("fold") == str(fold)
            ]
            prefect.set_flow_run_state(run.id, Cancelling(), force=True)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0
    assert checkpoint.is_file() and not keys.epoch_dir(fold, keys.run_key(fold, "tiny", HYPER, local), 1).exists()

    [record] = epoch_train(
        str(fold), TrainConfig(backend="local", epochs=1, local_model="tiny", hyper=HYPER), local=local
    )
    metrics = orjson.loads((Path(record.model) / keys.METRICS_FILE).read_bytes())
    assert metrics["resumed_from_step"] >= 3 and metrics["resumed_from_step"] % 3 == 0
    assert not checkpoint.exists()


def test_two_runs_of_one_fold_at_once_train_each_epoch_once(tmp_path: Path):
    """Two ``epoch-train`` runs of one fold started together: the second waits on the run directory's
    lock, then reuses each epoch the first trained (one ``train_epoch`` per epoch, nothing overwritten)."""
    import threading

    full = example_fold(tmp_path / "full" / "games")
    fold = tmp_path / "twins" / "games"
    fold.mkdir(parents=True)
    for name in ("train.jsonl", "val.jsonl"):  # a few rows: two short epochs
        (fold / name).write_text("".join((full / name).read_text().splitlines(keepends=True)[:16]))
    local = local_config(tmp_path)
    train = TrainConfig(backend="local", epochs=2, local_model="tiny", hyper=HYPER)
    states: dict[int, object] = {}

    def run(i: int) -> None:
        states[i] = epoch_train(str(fold), train=train, local=local, return_state=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(state.is_completed() for state in states.values())
    first, second = (states[i].result() for i in range(2))
    assert first == second  # the same adapters with the same metrics: trained once, reused once
    for record in first:
        metrics = orjson.loads((Path(record.model) / keys.METRICS_FILE).read_bytes())
        # what is on disk is what both runs returned: no second training overwrote it
        assert metrics["finished_at"] == record.finished_at.isoformat()
        assert metrics["resumed_from_step"] == 0
    key = keys.run_key(fold, "tiny", HYPER, local)
    assert sorted(p.name for p in keys.run_dir(fold, key).glob("epoch-*")) == ["epoch-1", "epoch-2"]
