"""Local DPO and GRPO through ``epoch-train`` on the tiny offline model: a toy GRPO task whose mean reward
rises over 3 epochs, a toy DPO task whose validation reward accuracy rises, an SFT epoch continued by DPO,
a SIGKILLed epoch of each resuming exactly, and the constraints checked before any model loads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from prefect import flow

from epochwise.config.train import GRPOParams, HyperParams, TrainConfig
from epochwise.epochs import epoch_table
from epochwise.local import keys
from epochwise.problems import UserError
from flows.epoch_train import epoch_train
from tasks.local_rl import rl_run_key, train_local_rl_epoch
from tests.helpers import REPO, local_config

# A reward the random-init model can climb: the share of digits in the reply (graded, so groups differ).
REWARDS = """
def digits(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def needs_target(prompts, completions, target):
    return [0.0 for _ in completions]
"""
GRPO_HYPER = HyperParams(learning_rate=1e-2)
DPO_HYPER = HyperParams(learning_rate=2e-3)


def grpo_fold(root: Path, name: str, n_train: int = 64, n_val: int = 8) -> tuple[Path, str]:
    """Prompt rows asking for digits, and the reward file's spec. Each test names its fold: the
    ``<fold>-epochs`` table of one name is shared by the session's runs."""
    fold = root / name
    fold.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}: 1 2 3 in digits"}], "n": i} for i in range(72)]
    (fold / "train_grpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (fold / "val_grpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[64 : 64 + n_val]))
    (root / "rewards.py").write_text(REWARDS)
    return fold, f"{root / 'rewards.py'}:digits"


def preference_rows(n: int, offset: int = 0) -> str:
    """'say yes' / 'say no' prompts: the preferred reply follows the prompt, the rejected one does not."""

    def pair(i: int) -> str:
        want, other = ("yes", "no") if i % 2 else ("no", "yes")
        return json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": f"Question {i}: say {want}."}]},
                "preferred_output": [{"role": "assistant", "content": want}],
                "non_preferred_output": [{"role": "assistant", "content": other}],
            }
        )

    return "".join(pair(offset + i) + "\n" for i in range(n))


def dpo_fold(root: Path, name: str, n_train: int = 48) -> Path:
    fold = root / name
    fold.mkdir(parents=True)
    (fold / "train_dpo.jsonl").write_text(preference_rows(n_train))
    (fold / "val_dpo.jsonl").write_text(preference_rows(16, offset=1000))
    return fold


def grpo_train(spec: str, epochs: int = 3, **grpo) -> TrainConfig:
    params = GRPOParams(num_generations=4, max_new_tokens=16, prompts_per_step=2, **grpo)
    return TrainConfig(backend="local", method="grpo", epochs=epochs, rewards=[spec], hyper=GRPO_HYPER, grpo=params)


def test_local_grpo_mean_reward_rises_over_three_epochs(tmp_path: Path):
    fold, spec = grpo_fold(tmp_path, "digits-rise")
    local = local_config(tmp_path, micro_batch_size=8)
    records = epoch_train(str(fold), train=grpo_train(spec), local=local)

    assert [(r.epoch, r.method, r.status) for r in records] == [(k, "grpo", "completed") for k in (1, 2, 3)]
    assert records[0].parent == "tiny" and [r.parent for r in records[1:]] == [r.model for r in records[:2]]
    key = rl_run_key(str(fold), grpo_train(spec), local)
    for record in records:
        assert record.model == str(keys.epoch_dir(fold, key, record.epoch))
        assert (Path(record.model) / "adapter_model.safetensors").is_file()
        assert set(record.metrics) >= {
            "reward_mean", "reward_std", "digits_mean", "digits_std", "zero_std_share", "val_kl", "val_digits_mean",
        }  # fmt: skip
        assert 0 <= record.metrics["zero_std_share"] <= 1 and record.metrics["val_kl"] >= 0
    means = [r.metrics["reward_mean"] for r in records]
    assert means[2] > means[0], means  # the policy learnt to write digits
    assert records[2].val_reward > records[0].val_reward, [r.val_reward for r in records]
    assert records[2].metrics["val_kl"] > records[0].metrics["val_kl"]  # it moved away from the base
    again = epoch_train(str(fold), train=grpo_train(spec), local=local)  # finished epochs are not redone
    assert [(r.model, r.finished_at) for r in again] == [(r.model, r.finished_at) for r in records]


def test_local_dpo_val_reward_accuracy_rises(tmp_path: Path):
    fold = dpo_fold(tmp_path, "yesno-rise")
    train = TrainConfig(backend="local", method="dpo", epochs=3, hyper=DPO_HYPER, wandb_project="epochwise-test")
    records = epoch_train(str(fold), train=train, local=local_config(tmp_path))

    assert [(r.epoch, r.method) for r in records] == [(1, "dpo"), (2, "dpo"), (3, "dpo")]
    accuracy = [r.metrics["val_reward_accuracy"] for r in records]
    margin = [r.metrics["val_reward_margin"] for r in records]
    assert accuracy[2] > accuracy[0] and accuracy[2] >= 0.9, accuracy
    assert margin[0] < margin[1] < margin[2], margin
    assert records[0].val_loss > records[1].val_loss > records[2].val_loss  # the DPO loss on val
    row = epoch_table(records)[2]
    assert row["method"] == "dpo" and row["metrics"].startswith(f"val acc {accuracy[2]:.2f}, val margin")
    assert len(sorted((fold / "local" / "wandb").glob("offline-run-*"))) == 3  # one W&B run per epoch (offline)
    metrics = orjson.loads((Path(records[1].model) / keys.METRICS_FILE).read_bytes())
    assert metrics["reference"] is None  # the chain's reference stays the base model for all its epochs


def test_an_sft_epoch_is_the_parent_and_reference_of_the_dpo_epochs_after_it(tmp_path: Path):
    fold = dpo_fold(tmp_path, "yesno-after-sft")
    chat = [
        {"messages": [{"role": "user", "content": f"Question {i}: say yes."}, {"role": "assistant", "content": "yes"}]}
        for i in range(12)
    ]
    (fold / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat[:10]))
    (fold / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat[10:]))
    local = local_config(tmp_path)
    [sft] = epoch_train(str(fold), train=TrainConfig(backend="local", epochs=1, hyper=DPO_HYPER), local=local)
    train = TrainConfig(backend="local", method="dpo", epochs=3, hyper=DPO_HYPER)
    records = epoch_train(str(fold), train=train, local=local)

    assert [(r.epoch, r.method) for r in records] == [(1, "sft"), (2, "dpo"), (3, "dpo")]
    assert records[1].parent == sft.model and records[2].parent == records[1].model
    sft_metrics = orjson.loads((Path(sft.model) / keys.METRICS_FILE).read_bytes())
    for record in records[1:]:
        metrics = orjson.loads((Path(record.model) / keys.METRICS_FILE).read_bytes())
        assert metrics["base_model"] == sft_metrics["base_model"]  # the SFT epoch's tiny base and tokenizer
        assert metrics["reference"] == sft.model  # log-ratios against the SFT model, not the bare base
    assert records[2].metrics["val_reward_margin"] > records[1].metrics["val_reward_margin"]


CHILD = """
import sys
from pathlib import Path
from epochwise.local.dpo import train_dpo_epoch
from epochwise.local.grpo import train_grpo_epoch
from epochwise.rewards import load_rewards
from epochwise.config.train import TrainConfig
from tests.helpers import local_config

method, fold, root, train = sys.argv[1], sys.argv[2], Path(sys.argv[3]), TrainConfig.model_validate_json(sys.argv[4])
local = local_config(root, micro_batch_size=int(sys.argv[5]), checkpoint_every=3)

def on_step(step, total, metrics):
    print(step, total, flush=True)

key = sys.argv[6]
if method == "dpo":
    train_dpo_epoch(fold, 1, "tiny", train.hyper, train.dpo, local, key, None, on_step)
else:
    train_grpo_epoch(fold, 1, "tiny", train, load_rewards(train.rewards), local, key, None, on_step)
"""


def kill_mid_epoch(method: str, fold: Path, root: Path, train: TrainConfig, micro: int, key: str) -> int:
    """Run epoch 1 in a child, SIGKILL it after step 7 (checkpoints after steps 3 and 6); the total steps."""
    args = [method, str(fold), str(root), train.model_dump_json(), str(micro), key]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        step, total = map(int, line.split())
        if step >= 7:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL and step < total  # killed mid-epoch
    assert keys.checkpoint_path(fold, key, 1).is_file() and not keys.epoch_dir(fold, key, 1).exists()
    return total


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_a_sigkilled_epoch_resumes_from_its_checkpoint_exactly(tmp_path: Path, method: str):
    """The rerun continues at the last checkpoint with the same data order and random stream (GRPO's
    sampled completions included), so its per-step curve equals an uninterrupted run's."""
    if method == "grpo":
        fold, spec = grpo_fold(tmp_path / "killed", "digits-killed", n_train=40, n_val=4)
        train, micro = grpo_train(spec, epochs=1), 8
    else:
        fold, train, micro = (
            dpo_fold(tmp_path / "killed", "yesno-killed"),
            TrainConfig(method="dpo", hyper=DPO_HYPER),
            1,
        )
        train = train.model_copy(update={"hyper": DPO_HYPER.model_copy(update={"batch_size": 2})})
    local = local_config(tmp_path, micro_batch_size=micro, checkpoint_every=3)
    reference_fold = tmp_path / "reference" / fold.name
    shutil.copytree(fold, reference_fold)
    key = rl_run_key(str(fold), train, local)
    total = kill_mid_epoch(method, fold, tmp_path, train, micro, key)

    @flow
    def rerun():
        return train_local_rl_epoch(str(fold), 1, train, local, None)

    record = rerun()
    metrics = orjson.loads((Path(record.model) / keys.METRICS_FILE).read_bytes())
    assert metrics["resumed_from_step"] >= 6 and metrics["resumed_from_step"] % 3 == 0
    assert metrics["steps"] == total == len(metrics["step_metrics"])
    assert not keys.checkpoint_path(fold, key, 1).exists()

    [reference] = epoch_train(
        str(reference_fold), train=train.model_copy(update={"backend": "local", "epochs": 1}), local=local
    )
    expected = orjson.loads((Path(reference.model) / keys.METRICS_FILE).read_bytes())
    assert expected["resumed_from_step"] == 0
    def flat(steps: list[dict[str, float]]) -> list[float]:
        return [step[name] for step in steps for name in sorted(step)]

    assert flat(metrics["step_metrics"]) == pytest.approx(flat(expected["step_metrics"]), rel=1e-6, abs=1e-6)
    assert metrics["metrics"] == pytest.approx(expected["metrics"], rel=1e-6, abs=1e-6)


def test_grpo_constraints_and_rewards_fail_before_any_model_loads(tmp_path: Path):
    fold, spec = grpo_fold(tmp_path, "digits-refused", n_train=4, n_val=2)
    local = local_config(tmp_path)

    def refused(train: TrainConfig) -> str:
        with pytest.raises(UserError) as caught:
            epoch_train(str(fold), train=train, local=local)
        return str(caught.value)

    odd = grpo_train(spec).model_copy(update={"hyper": GRPO_HYPER.model_copy(update={"batch_size": 6})})
    message = refused(odd)
    assert "train.hyper.batch_size (6)" in message and "divisible by train.grpo.num_generations (4)" in message
    assert "at least one reward function" in refused(grpo_train(spec).model_copy(update={"rewards": []}))
    message = refused(grpo_train(spec.replace(":digits", ":needs_target")))
    assert "needs_target" in message and "train_grpo.jsonl:1" in message and "**kwargs" in message
    message = refused(grpo_train(spec.replace(":digits", ":missing")))
    assert "has no function 'missing'" in message and "digits" in message
    with pytest.raises(ValueError, match="num_generations"):
        GRPOParams(num_generations=1)
    assert not local.cache_dir.exists()  # no tiny model was built: every check ran before the model
