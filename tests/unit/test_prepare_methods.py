"""``prepare`` of DPO preference rows and GRPO prompt rows (``data.mapping.format: preference | prompt``),
the example records and rewards shipped for them, and the method files of a fold."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config import load_settings
from epochwise.config.data import DataConfig, RecordMapping
from epochwise.fold import Fold
from epochwise.prepare import prepare
from epochwise.problems import InputError
from epochwise.records import MappingError, SourceRecord, preference_line, prompt_line, read_records
from epochwise.rewards import as_completions, check_rewards, load_rewards, score
from epochwise.validate import validate_method_file

REPO = Path(__file__).resolve().parents[2]
PREFS = RecordMapping(format="preference", system_prompt="sys", user_template="Q: {q}", chosen_field="good", rejected_field="bad")
PROMPTS = RecordMapping(format="prompt", system_prompt="sys", user_template="Q: {q}", columns=["answer"])


def records(rows: list[dict]) -> list[SourceRecord]:
    return [SourceRecord("recs.jsonl", i + 1, row) for i, row in enumerate(rows)]


def test_preference_row_from_template_and_reply_fields():
    row = orjson.loads(preference_line({"q": "2+2", "good": "4", "bad": {"guess": 5}}, PREFS))
    assert row == {
        "input": {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q: 2+2"}]},
        "preferred_output": [{"role": "assistant", "content": "4"}],
        "non_preferred_output": [{"role": "assistant", "content": '{"guess":5}'}],
    }


def test_preference_row_from_the_records_own_messages():
    mapping = RecordMapping(format="preference", system_prompt="sys", chosen_field="good", rejected_field="bad")
    row = orjson.loads(preference_line({"messages": [{"role": "user", "content": "hi"}], "good": "a", "bad": "b"}, mapping))
    assert row["input"]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "record, mapping, reason",
    [
        ({"q": "x", "bad": "b"}, PREFS, "missing chosen field 'good'"),
        ({"q": "x", "good": "a"}, PREFS, "missing rejected field 'bad'"),
        ({"q": "x", "good": "", "bad": "b"}, PREFS, "chosen field 'good' is empty"),
        ({"q": "x", "good": "same", "bad": "same"}, PREFS, "hold the same reply"),
        ({"good": "a", "bad": "b"}, PREFS, "missing field 'q' used by the user template"),
        ({"q": "x", "good": "a", "bad": "b"}, RecordMapping(format="preference", user_template="{q}"), "needs data.mapping.chosen_field"),
        ({"good": "a", "bad": "b"}, RecordMapping(format="preference", chosen_field="good", rejected_field="bad"),
         "configure data.mapping.user_template"),
        ({"q": "x"}, PROMPTS, "missing column 'answer' (data.mapping.columns)"),
    ],
)
def test_mapping_errors_name_the_missing_field(record, mapping, reason):
    line = preference_line if mapping.format == "preference" else prompt_line
    with pytest.raises(MappingError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        line(record, mapping)


def test_prompt_row_carries_the_named_columns_as_they_are():
    row = orjson.loads(prompt_line({"q": "2+2", "answer": 4, "unused": "x"}, PROMPTS))
    assert row == {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q: 2+2"}], "answer": 4}


def test_columns_must_be_plain_names_other_than_messages():
    for bad in (["messages"], ["not a name"], ["a", "a"]):
        with pytest.raises(ValidationError):
            RecordMapping(format="prompt", columns=bad)


def test_prepare_writes_method_files_beside_the_chat_files_and_skips_bad_records(tmp_path):
    fold = tmp_path / "fold"
    chat = RecordMapping(user_template="Q: {q}", assistant_field="good")
    rows = [{"q": f"{i}+{i}", "good": str(2 * i), "bad": "no idea", "answer": 2 * i} for i in range(10)]
    prepare(records(rows), fold, DataConfig(mapping=chat))
    summary = prepare(records([*rows, {"q": "x", "good": "a"}]), fold, DataConfig(mapping=PREFS))
    assert summary.files == ("train_dpo.jsonl", "val_dpo.jsonl") and summary.train_written + summary.val_written == 10
    assert [(p.line, p.reason) for p in summary.skipped] == [(11, "missing rejected field 'bad'")]
    prepare(records(rows), fold, DataConfig(mapping=PROMPTS))
    assert sorted(p.name for p in fold.iterdir()) == [
        "train.jsonl", "train_dpo.jsonl", "train_grpo.jsonl", "val.jsonl", "val_dpo.jsonl", "val_grpo.jsonl"
    ]
    for method in ("sft", "dpo", "grpo"):
        assert Fold.of(fold).files(method)[0].name == {"sft": "train.jsonl"}.get(method, f"train_{method}.jsonl")
        assert all(validate_method_file(p, method, run_together_check=False) == [] for p in Fold.of(fold).files(method))


def test_records_with_their_own_messages_ending_with_the_assistant_are_skipped(tmp_path):
    mapping = RecordMapping(format="prompt")
    rows = [{"messages": [{"role": "user", "content": "q"}]}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(InputError, match=r"recs.jsonl:2: ends with an assistant message"):
        prepare(records(rows), tmp_path / "f", DataConfig(mapping=mapping, strict=True))


def test_a_method_fold_falls_back_to_train_jsonl(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert Fold.of(tmp_path).files("dpo") == (tmp_path / "train.jsonl", tmp_path / "val.jsonl")


def test_cli_prepare_format_flags(tmp_path):
    src = tmp_path / "recs.jsonl"
    src.write_text("".join(json.dumps({"q": f"{i}", "good": "yes", "bad": f"no {i}"}) + "\n" for i in range(6)))
    result = CliRunner().invoke(app, ["prepare", str(src), "--fold", str(tmp_path / "f"), "--format", "preference",
                                      "--user-template", "Q: {q}", "--chosen-field", "good", "--rejected-field", "bad"])
    assert result.exit_code == 0, result.output
    assert "train_dpo.jsonl" in result.output and (tmp_path / "f" / "val_dpo.jsonl").is_file()


# --- the shipped examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, method", [("rps-dpo", "dpo"), ("rps-grpo", "grpo")])
def test_example_records_prepare_into_valid_method_folds(tmp_path, name, method):
    source = REPO / "examples" / "records" / name
    data = load_settings(REPO / "epochwise.yaml", records_file=source / "epochwise.yaml").data
    summary = prepare(read_records(source).records, tmp_path / name, data)
    assert summary.skipped == [] and summary.train_written + summary.val_written == 240
    for path in Fold.of(tmp_path / name).files(method):
        assert path.name.endswith(f"_{method}.jsonl")
        assert validate_method_file(path, method, run_together_check=False) == []


def test_example_rewards_score_format_and_correctness(tmp_path):
    source = REPO / "examples" / "records" / "rps-grpo"
    data = load_settings(REPO / "epochwise.yaml", records_file=source / "epochwise.yaml").data
    prepare(read_records(source).records, tmp_path / "g", data)
    rows = [orjson.loads(line) for line in (tmp_path / "g" / "train_grpo.jsonl").read_bytes().splitlines()]
    specs = ["examples/rewards/rps.py:format_reward", "examples/rewards/rps.py:correctness_reward"]
    rewards = load_rewards(specs, base=REPO)
    check_rewards(rewards, rows, "train_grpo.jsonl")
    texts = ["paper", "Paper.", "paper, I think", "I think rock", "", "zq", "rock"]
    prompts, columns = [rows[0]["messages"]] * len(texts), {"answer": ["paper"] * len(texts)}
    fmt, correct = (score(r, prompts, as_completions(texts), columns) for r in rewards)
    assert fmt[:2] == [1.0, 1.0] and 0.5 < fmt[2] < 1.0 and 0.25 < fmt[3] < 0.5 and fmt[4] == 0.0 and 0 < fmt[5] < 0.25
    assert correct == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert score(rewards[1], prompts[:1], as_completions(["paper"]), {"answer": [None]}) == [None]
