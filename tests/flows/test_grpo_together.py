"""GRPO on Together's post-training API, against the fake with the real SDK: a 2-epoch run whose mean
reward rises, idempotent operations, resume without repeating an applied step, the budget before
provisioning, the resource stopped after a failure and by the reaper, deploy of a GRPO epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epochwise.config.together import PostTrainingConfig
from epochwise.config.train import GRPOParams, HyperParams
from flows.epoch_train import epoch_train
from tests.fake_together import post_training as fake_pt
from tests.helpers import BASE, FAST, train_cfg

PT = FAST.model_copy(update={"post_training": PostTrainingConfig(poll_s=0.001, ready_deadline_s=30, op_deadline_s=30)})
REWARDS = '''
def letter_a(prompts, completions, target, **kwargs):
    """Share of the completion's characters that are the row's target letter."""
    return [c[0]["content"].count(t) / max(len(c[0]["content"]), 1) for c, t in zip(completions, target)]
'''


def grpo_fold(root: Path, name: str, tag: str, n_train: int = 8, n_val: int = 2) -> tuple[Path, str]:
    """A fold of prompt rows (``messages`` + a ``target`` column) and a reward file beside it."""
    fold = root / name
    fold.mkdir(parents=True)

    def row(i: int) -> str:
        return json.dumps({"messages": [{"role": "system", "content": f"fold {tag}"},
                                        {"role": "user", "content": f"Write letters, prompt {i}"}],
                           "target": "a"})

    (fold / "train.jsonl").write_text("".join(row(i) + "\n" for i in range(n_train)))
    (fold / "val.jsonl").write_text("".join(row(100 + i) + "\n" for i in range(n_val)))
    (root / "rewards.py").write_text(REWARDS)
    return fold, f"{root / 'rewards.py'}:letter_a"


def grpo_cfg(reward: str, epochs: int = 2, **kw):
    return train_cfg(
        epochs, method="grpo", rewards=[reward],
        hyper=HyperParams(learning_rate=1e-4),
        grpo=GRPOParams(num_generations=4, max_new_tokens=8, prompts_per_step=2, tokenizer="bytes"), **kw,
    )


def test_two_grpo_epochs_reward_rises_checkpoints_and_nothing_left_billing(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "g1", "rise")
    records = epoch_train(str(fold), grpo_cfg(reward), PT)
    pt = fake_pt.state(fake_together)
    assert [r.epoch for r in records] == [1, 2] and all(r.method == "grpo" for r in records)
    assert records[1].val_reward > records[0].val_reward > 1 / 26  # uniform sampling scores 1/26
    assert records[1].metrics["train_reward"] > records[0].metrics["train_reward"]
    assert len(pt.resources) == 1 and pt.billing() == []  # one resource, stopped at the end
    assert pt.applied["optim-step"] == 2 * 4  # 8 prompts / 2 per step, 2 epochs
    assert pt.applied["training-checkpoint"] == 2 and pt.applied["inference-checkpoint"] == 2
    second = next(s for s in pt.sessions.values() if s.body["display_name"].startswith("ew-g1-e2-"))
    assert second.body["resume_from_checkpoint_id"] == records[0].job_id
    assert records[1].model.startswith("projects/proj_1/models/ml_") and "/revisions/rv_" in records[1].model
    assert fake_together.counts["POST /v1/rl/model-resources/{id}/extend-expiry"] >= 8
    # a rerun finds both epochs done: nothing provisioned, nothing applied
    again = epoch_train(str(fold), grpo_cfg(reward), PT)
    assert [r.job_id for r in again] == [r.job_id for r in records]
    assert len(pt.resources) == 1 and pt.applied["optim-step"] == 8
