"""Harmony conversion of whole folds: labels over the example fold, parquet shape, reuse, length policy, errors.

Real files throughout: the example fold is built from examples/records/games with `epochwise.prepare.prepare`,
converted, and read back with pyarrow; together's own ``check_file`` judges the parquet.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from together.lib import check_file
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config.data import DataConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.harmony import (
    IGNORE_INDEX,
    O200K_FILE,
    O200K_SHA256,
    ensure_vocab_dir,
    harmony_paths,
    load_encoding,
    read_parquet_rows,
)
from epochwise.harmony import convert_fold as convert
from epochwise.io import sha256_file
from epochwise.prepare import prepare
from epochwise.problems import InputError
from epochwise.records import read_records
from tests.helpers import EXAMPLE_RECORDS, STORY


@pytest.fixture(scope="module")
def example_fold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example records prepared into a fold once per module (360 conversations)."""

    fold = tmp_path_factory.mktemp("folds") / "games"
    prepare(read_records(EXAMPLE_RECORDS).records, fold, DataConfig(mapping=STORY))
    return fold


@pytest.fixture(scope="module")
def converted(example_fold: Path) -> dict:
    return convert(example_fold, HarmonyConfig(reasoning_effort="low")).as_dict()


def write_fold(fold: Path, train: list[dict], val: list[dict] | None = None) -> Path:
    fold.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        if rows is not None:
            (fold / name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return fold


def chat(user: str, reply: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply, **extra}]}


# --- the example fold -----------------------------------------------------------------------------


def test_example_fold_labels_are_never_all_masked_nor_all_trained(converted: dict, example_fold: Path) -> None:
    vocab = load_encoding(str(ensure_vocab_dir()))
    checked = 0
    for split in ("train", "val"):
        for row in read_parquet_rows(converted[split]):
            ids, mask, labels = row["input_ids"], row["attention_mask"], row["labels"]
            assert len(ids) == len(mask) == len(labels)
            assert set(mask) == {1}
            trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
            assert trained, "a row with every label masked trains nothing"
            assert len(trained) < len(labels), "a row with every token trained would train on the prompt"
            assert all(labels[i] == ids[i] for i in trained)
            # The trained part is the tail: the one assistant reply, ending with <|return|>.
            assert trained == list(range(trained[0], len(ids)))
            assert vocab.decode_utf8(ids[trained[0] :]).startswith("<|channel|>final<|message|>{")
            assert vocab.decode_utf8(ids[-1:]) == "<|return|>"
            checked += 1
    assert checked == 360 == converted["rows"]
    assert converted["labelled_tokens"] < converted["tokens"]


def test_labels_cover_the_reply_and_not_the_prompt(converted: dict, example_fold: Path) -> None:
    """Row by row against the fold's JSONL: the trained text is the assistant's reply, the story is not."""
    vocab = load_encoding(str(ensure_vocab_dir()))
    rows = read_parquet_rows(converted["train"])
    lines = (example_fold / "train.jsonl").read_bytes().splitlines()
    assert len(rows) == len(lines)
    for row, line in zip(rows, lines, strict=True):
        messages = orjson.loads(line)["messages"]
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
        assert vocab.decode_utf8(trained) == f"<|channel|>final<|message|>{messages[-1]['content']}<|return|>"
        prompt = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == IGNORE_INDEX]
        assert messages[1]["content"] in vocab.decode_utf8(prompt)


def test_parquet_has_exactly_the_three_int_list_columns(converted: dict) -> None:
    schema = pq.read_schema(converted["train"])
    assert schema.names == ["input_ids", "attention_mask", "labels"]
    assert all(str(field.type).startswith("list<element: int") for field in schema)


@pytest.mark.parametrize("split", ["train", "val"])
def test_together_check_file_passes(converted: dict, split: str) -> None:
    report = check_file(Path(converted[split]), purpose="fine-tune")
    assert report["is_check_passed"] is True
    assert report.get("load_parquet") in (None, True)
    assert report["filetype"] == "parquet"


def test_summary_counts_match_the_files(converted: dict) -> None:
    for split in ("train", "val"):
        rows = read_parquet_rows(converted[split])
        stats = converted["splits"][split]
        assert stats["rows"] == len(rows)
        assert stats["tokens"] == sum(len(r["input_ids"]) for r in rows)
        assert stats["labelled_tokens"] == sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
        assert stats["longest"] == max(len(r["input_ids"]) for r in rows)
        assert stats["over_max"] == stats["dropped"] == stats["truncated"] == 0


# --- reuse (the conversion cache) -----------------------------------------------------------------


def test_second_run_reuses_the_outputs_untouched(tmp_path: Path, example_fold: Path) -> None:
    fold = tmp_path / "games"
    shutil.copytree(example_fold, fold, ignore=shutil.ignore_patterns("harmony"))
    first = convert(fold, HarmonyConfig())
    inode = os.stat(first.train.output).st_ino
    os.utime(fold / "train.jsonl", (1, 1))  # a new mtime alone is not a change
    second = convert(fold, HarmonyConfig(workers=2, vocab_dir=ensure_vocab_dir()))  # neither changes bytes
    assert (first.cached, second.cached) == (False, True)
    assert second.key == first.key
    assert os.stat(second.train.output).st_ino == inode
    assert second.as_dict()["rows"] == first.as_dict()["rows"]


@pytest.mark.parametrize(
    "change",
    ["source", "settings", "deleted output", "edited output"],
)
def test_any_real_change_reconverts(tmp_path: Path, change: str) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b"), chat("c", "d")], [chat("e", "f")])
    config = HarmonyConfig(reasoning_effort="low")
    first = convert(fold, config)
    if change == "source":
        write_fold(fold, [chat("a", "b"), chat("c", "D")], [chat("e", "f")])
    elif change == "settings":
        config = HarmonyConfig(reasoning_effort="high")
    elif change == "deleted output":
        os.unlink(first.val.output)
    else:
        Path(first.train.output).write_bytes(Path(first.train.output).read_bytes() + b"x")
    second = convert(fold, config)
    assert second.cached is False
    assert (second.key != first.key) == (change in ("source", "settings"))
    assert check_file(Path(second.train.output), purpose="fine-tune")["is_check_passed"]


def test_key_ignores_paths_and_reconversion_is_byte_identical(tmp_path: Path) -> None:
    rows = [chat("q1", "a1"), chat("q2", "a2", thinking="t2")]
    one = convert(write_fold(tmp_path / "one", rows, rows[:1]), HarmonyConfig())
    two = convert(write_fold(tmp_path / "elsewhere" / "two", rows, rows[:1]), HarmonyConfig())
    assert one.key == two.key
    assert sha256_file(one.train.output) == sha256_file(two.train.output)
    again = convert(tmp_path / "one", HarmonyConfig(), force=True)
    assert again.cached is False
    assert sha256_file(again.train.output) == sha256_file(one.train.output)


def test_manifest_records_key_sources_and_outputs(converted: dict, example_fold: Path) -> None:
    manifest = orjson.loads(Path(converted["manifest"]).read_bytes())
    assert manifest["key"] == converted["key"]
    assert manifest["sources"]["train"] == sha256_file(example_fold / "train.jsonl")
    assert manifest["outputs"]["val"] == sha256_file(converted["val"]) == converted["splits"]["val"]["sha256"]
    assert manifest["settings"] == {"reasoning_effort": "low", "max_seq_length": 8192, "overlong": "error"}


# --- rows over max_seq_length ---------------------------------------------------------------------


def long_fold(tmp_path: Path) -> Path:
    return write_fold(
        tmp_path / "f",
        [chat("short", "ok"), chat("long " * 300, "fine"), chat("q", "long answer " * 300), chat("x", "y")],
        [chat("v", "w")],
    )


def test_overlong_error_lists_source_lines_and_writes_nothing(tmp_path: Path) -> None:
    fold = long_fold(tmp_path)
    with pytest.raises(InputError) as caught:
        convert(fold, HarmonyConfig(max_seq_length=200))
    lines = [(p.path.endswith("train.jsonl"), p.line) for p in caught.value.problems]
    assert lines == [(True, 2), (True, 3)]
    assert "over max_seq_length 200" in caught.value.problems[0].reason
    paths = harmony_paths(fold)
    assert not any(paths[k].exists() for k in paths)
    assert not list(paths["train"].parent.glob(".*tmp*"))


def test_overlong_error_leaves_previous_outputs_in_place(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b")], [chat("c", "d")])
    before = convert(fold, HarmonyConfig())
    digest = sha256_file(before.train.output)
    write_fold(fold, [chat("a", "b " * 400)], [chat("c", "d")])
    with pytest.raises(InputError):
        convert(fold, HarmonyConfig(max_seq_length=100))
    assert sha256_file(before.train.output) == digest


def test_overlong_drop(tmp_path: Path) -> None:
    summary = convert(long_fold(tmp_path), HarmonyConfig(max_seq_length=200, overlong="drop"))
    assert (summary.train.rows_read, summary.train.rows, summary.train.over_max, summary.train.dropped) == (4, 2, 2, 2)
    assert summary.train.longest > 200
    assert all(len(r["input_ids"]) <= 200 for r in read_parquet_rows(summary.train.output))


def test_overlong_truncate_keeps_rows_with_trained_tokens(tmp_path: Path) -> None:
    summary = convert(long_fold(tmp_path), HarmonyConfig(max_seq_length=200, overlong="truncate"))
    # The long prompt leaves no room for its reply (dropped); the long reply is cut (kept, truncated).
    assert (summary.train.rows, summary.train.truncated, summary.train.dropped) == (3, 1, 1)
    rows = read_parquet_rows(summary.train.output)
    assert sorted(len(r["input_ids"]) for r in rows)[-1] == 200
    assert all(any(x != IGNORE_INDEX for x in r["labels"]) for r in rows)


# --- bad input ------------------------------------------------------------------------------------


def test_unconvertible_rows_are_reported_with_their_lines(tmp_path: Path) -> None:
    fold = tmp_path / "f"
    fold.mkdir()
    (fold / "train.jsonl").write_bytes(
        orjson.dumps(chat("a", "b"))
        + b"\n"
        + b"{not json\n"
        + orjson.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "calling"},
                    {"role": "tool", "content": "r"},
                    {"role": "assistant", "content": "s"},
                ]
            }
        )
        + b"\n"
        + orjson.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}],
                    },
                    {"role": "assistant", "content": "s"},
                ]
            }
        )
        + b"\n"
        + orjson.dumps(chat("a", "b", thinking=["not", "text"]))
        + b"\n"
        + orjson.dumps({"prompt": "p", "completion": "c"})
        + b"\n"
    )
    with pytest.raises(InputError) as caught:
        convert(fold, HarmonyConfig())
    found = {p.line: p.reason for p in caught.value.problems}
    assert sorted(found) == [2, 3, 4, 5, 6]
    assert "invalid JSON" in found[2]
    assert "role 'tool'" in found[3]
    assert "text-only" in found[4]
    assert "thinking must be a string" in found[5]
    assert "no 'messages'" in found[6]
    assert str(caught.value.problems[0]).endswith(f"train.jsonl:2: {found[2]}")


def test_tool_calls_are_reported_not_crashed_on() -> None:
    """Together accepts an assistant turn with tool_calls and no content; Harmony conversion refuses it."""
    from epochwise.harmony import ConversionError, to_harmony

    call = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}
    messages = [
        {"role": "user", "content": "q"},
        call,
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "s"},
    ]
    with pytest.raises(ConversionError, match=r"^messages\[1\] has tool_calls; the Harmony conversion supports text"):
        to_harmony(messages, "low")


def test_rows_with_only_untrained_turns_are_left_out_and_counted(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b", weight=0), chat("c", "d")], [chat("e", "f")])
    summary = convert(fold, HarmonyConfig())
    assert (summary.train.rows, summary.train.untrained) == (1, 1)


def test_fold_without_val_converts_train_only_and_removes_a_stale_val(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b")], [chat("c", "d")])
    assert convert(fold, HarmonyConfig()).val is not None
    (fold / "val.jsonl").unlink()
    summary = convert(fold, HarmonyConfig())
    assert summary.val is None and summary.as_dict()["val"] is None
    assert not harmony_paths(fold)["val"].exists()
    assert summary.cached is False and summary.train.rows == 1


def test_a_broken_manifest_means_reconvert(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b")], [chat("c", "d")])
    first = convert(fold, HarmonyConfig())
    manifest = orjson.loads(Path(first.manifest).read_bytes())
    del manifest["splits"]
    Path(first.manifest).write_bytes(orjson.dumps(manifest))
    again = convert(fold, HarmonyConfig())
    assert again.cached is False and again.key == first.key
    assert convert(fold, HarmonyConfig()).cached is True


def test_missing_fold_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="convert needs a prepared fold"):
        convert(tmp_path / "nope", HarmonyConfig())


# --- the vocab ------------------------------------------------------------------------------------


def test_vocab_is_unpacked_from_bpe_openai_and_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = ensure_vocab_dir()
    assert directory == tmp_path / "epochwise" / "tiktoken"
    assert sha256_file(directory / O200K_FILE) == O200K_SHA256
    (directory / O200K_FILE).write_bytes(b"garbage")
    assert sha256_file(ensure_vocab_dir() / O200K_FILE) == O200K_SHA256


def test_configured_vocab_dir_must_hold_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="o200k_base.tiktoken"):
        ensure_vocab_dir(tmp_path)


def test_a_corrupt_configured_vocab_is_refused_not_downloaded(tmp_path: Path) -> None:
    vocab = (ensure_vocab_dir() / O200K_FILE).read_bytes()
    (tmp_path / O200K_FILE).write_bytes(vocab[: vocab.index(b"\n", 100_000) + 1])  # whole lines, wrong hash
    with pytest.raises(RuntimeError, match="hash mismatch"):
        load_encoding(str(tmp_path))
    assert "TIKTOKEN_ENCODINGS_BASE" not in os.environ or os.environ["TIKTOKEN_ENCODINGS_BASE"] != str(tmp_path)


# --- the command line -----------------------------------------------------------------------------


def test_cli_convert_prints_the_summary(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b"), chat("c", "long " * 50)], [chat("e", "f")])
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(fold),
            "--format",
            "harmony",
            "--reasoning-effort",
            "low",
            "--max-seq-length",
            "100",
            "--overlong",
            "drop",
        ],
    )
    assert result.exit_code == 0, result.output
    stats = orjson.loads(harmony_paths(fold)["manifest"].read_bytes())["splits"]["train"]
    assert (stats["rows"], stats["dropped"]) == (1, 1)
    printed = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in result.output.splitlines()
        if line.count("│") == 4
    }
    assert printed["rows"] == str(stats["rows"])
    assert printed["tokens"] == str(stats["tokens"])
    assert printed["labelled tokens"] == str(stats["labelled_tokens"])
    assert printed["longest row (tokens)"] == str(stats["longest"]) and stats["longest"] > 100
    assert printed["rows over 100"] == "1"
    assert printed["dropped"] == "1"
    assert "reasoning effort low" in result.output


def test_cli_convert_overlong_error_exits_1_with_lines(tmp_path: Path) -> None:
    fold = write_fold(tmp_path / "f", [chat("a", "b"), chat("c", "long " * 50)], [chat("e", "f")])
    result = CliRunner().invoke(app, ["convert", str(fold), "--max-seq-length", "60"])
    assert result.exit_code == 1
    assert "train.jsonl:2: " in result.output
    assert "hint: raise --max-seq-length" in result.output


def test_cli_rejects_unknown_format(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["convert", str(tmp_path), "--format", "chatml"])
    assert result.exit_code != 0
    assert "only 'harmony'" in result.output


# --- the process pool -----------------------------------------------------------------------------


def test_process_pool_writes_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    """A fold at the pool threshold, converted with 1 and 2 workers: identical parquet, rows in order."""
    from epochwise.harmony import POOL_MIN_ROWS

    rows = [chat(f"question {i}: " + "word " * (i % 17), f"answer {i}") for i in range(POOL_MIN_ROWS)]
    one = convert(write_fold(tmp_path / "one", rows, rows[:3]), HarmonyConfig(workers=1))
    two = convert(write_fold(tmp_path / "two", rows, rows[:3]), HarmonyConfig(workers=2))
    assert sha256_file(one.train.output) == sha256_file(two.train.output)
    assert two.train.rows == POOL_MIN_ROWS


def test_a_copied_fold_reuses_its_outputs_at_the_new_place(tmp_path: Path) -> None:
    first = convert(write_fold(tmp_path / "a", [chat("q", "a")], [chat("v", "w")]), HarmonyConfig())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copied = convert(tmp_path / "b", HarmonyConfig())
    assert copied.cached is True and copied.key == first.key
    assert copied.train.output == str((tmp_path / "b" / "harmony" / "train_harmony.parquet").resolve())
