"""Reward functions are checked on a real row before any long work: each failure names the function and the row."""

from __future__ import annotations

import textwrap

import pytest

from epochwise.problems import UserError
from epochwise.rewards import as_completions, check_rewards, load_reward, load_rewards, prompt_columns, score

ROWS = [
    {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"},
    {"messages": [{"role": "user", "content": "3+3?"}], "answer": "6"},
]


def write(tmp_path, body: str):
    path = tmp_path / "rewards.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_file_reward_gets_columns_by_name_and_scores(tmp_path):
    write(
        tmp_path,
        """
        def correct(prompts, completions, answer, **kwargs):
            return [1.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]
        """,
    )
    reward = load_reward("rewards.py:correct", base=tmp_path)
    prompts, columns = prompt_columns(ROWS)
    assert columns == {"answer": ["4", "6"]}
    assert score(reward, prompts, as_completions(["4", "5"]), columns) == [1.0, 0.0]
    check_rewards([reward], ROWS, "train.jsonl")  # passes


def test_module_reward_imports_by_dotted_name():
    reward = load_reward("math:fsum")
    assert reward.name == "fsum"


@pytest.mark.parametrize(
    ("body", "spec", "message"),
    [
        ("def other(**kw): return []", "rewards.py:missing", "has no function 'missing' (it has: other)"),
        (
            "def r(prompts, completions): return [0.0] * len(prompts)",
            "rewards.py:r",
            "cannot be called with (prompts, completions, answer) from train.jsonl:1",
        ),
        (
            "def r(prompts, completions, **kw): return [0.0]",
            "rewards.py:r",
            "returned 1 values for 2 completions (called on train.jsonl:1)",
        ),
        ("def r(prompts, completions, **kw): return ['x', 1]", "rewards.py:r", "value 0 is 'x' (str), not a number"),
        (
            "def r(prompts, completions, **kw): return [float('nan'), 1]",
            "rewards.py:r",
            "value 0 is nan, not a finite number",
        ),
        (
            "def r(prompts, completions, **kw): raise KeyError('answer')",
            "rewards.py:r",
            "raised KeyError: 'answer' on train.jsonl:1",
        ),
        ("def r(prompts, completions, **kw): return 3", "rewards.py:r", "returned int, not a list of numbers"),
    ],
)
def test_broken_rewards_are_named_errors(tmp_path, body, spec, message):
    write(tmp_path, body)
    with pytest.raises(UserError) as error:
        check_rewards([load_reward(spec, base=tmp_path)], ROWS, "train.jsonl")
    assert message in str(error.value)
    assert spec in str(error.value)


def test_spec_errors(tmp_path):
    with pytest.raises(UserError, match="write it as module:function"):
        load_reward("rewards.py", base=tmp_path)
    with pytest.raises(UserError, match="no file"):
        load_reward("nowhere.py:fn", base=tmp_path)
    with pytest.raises(UserError, match="cannot import no_such_module_xyz"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(UserError, match="at least one reward"):
        load_rewards([])
    write(tmp_path, "raise RuntimeError('boom')")
    with pytest.raises(UserError, match="importing .* failed: RuntimeError: boom"):
        load_reward("rewards.py:fn", base=tmp_path)


def test_method_is_part_of_the_key_only_when_not_sft(tmp_path):
    from epochwise.config.local import LocalConfig
    from epochwise.config.train import TrainConfig
    from epochwise.local.keys import run_key
    from tests.helpers import make_fold

    fold = make_fold(tmp_path, "f", "method-key")
    sft, dpo = TrainConfig(), TrainConfig(method="dpo")
    grpo = TrainConfig(method="grpo", rewards=["r.py:f"])
    assert sft.method_fields() == {}
    assert dpo.method_fields() == {"method": "dpo", "dpo": dpo.dpo.model_dump(mode="json")}
    assert grpo.method_fields()["rewards"] == ["r.py:f"]

    def key(cfg: TrainConfig) -> str:
        return run_key(fold, "tiny", cfg.hyper, LocalConfig(), cfg.method_fields())

    assert key(sft) == run_key(fold, "tiny", sft.hyper, LocalConfig())  # SFT keys are unchanged
    assert len({key(sft), key(dpo), key(grpo)}) == 3


def test_an_edited_reward_file_is_a_new_grpo_key_and_is_imported_again(tmp_path, monkeypatch):
    from epochwise.config.train import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [1.0 for _ in completions]\n")
    grpo = TrainConfig(method="grpo", rewards=["r.py:f", "json:dumps"])
    before = grpo.method_fields()
    assert before["reward_sources"][0] is not None and before["reward_sources"][1] is not None  # file and module
    assert load_reward("r.py:f").fn([[1], [2]]) == [1.0, 1.0]

    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [0.5 for _ in completions]\n")
    assert grpo.method_fields() != before  # a changed reward trains again
    assert load_reward("r.py:f").fn([[1], [2]]) == [0.5, 0.5]  # and a long-lived process scores with the new one
    assert TrainConfig(method="grpo", rewards=["missing.py:f"]).method_fields()["reward_sources"] == [None]
