"""Local trainer data path: assistant-only labels, parquet rows, packing that keeps rows independent."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from epochwise.local.data import IGNORE, TokenRow, chatml_row, collate, pack, parquet_rows, read_rows, truncate
from epochwise.local.models import build_tiny, load_base
from epochwise.local.trainer import attention_bias, batch_loss
from tests.helpers import TEST_TINY, example_fold, labelled_spans, local_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    fold = example_fold(tmp_path_factory.mktemp("fold") / "games")
    local = local_config(tmp_path_factory.mktemp("cache"))
    model, tokenizer = load_base(str(build_tiny(fold, local)), torch.device("cpu"))
    return fold, model, tokenizer


def test_labels_decode_to_exactly_the_assistant_replies(tiny):
    fold, _, tokenizer = tiny
    lines = (fold / "train.jsonl").read_text().splitlines()[:5]
    for line in lines:
        messages = json.loads(line)["messages"]
        row = chatml_row(messages, tokenizer)
        spans = labelled_spans(row)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(s, skip_special_tokens=True) for s in spans] == replies
        # each reply ends with its end-of-turn token (so the model learns to stop); nothing after it
        assert all(s[-1] == tokenizer.eos_token_id for s in spans)
        assert tokenizer.decode(row.input_ids).endswith("<|im_end|>\n")


def test_multi_turn_labels_every_reply_and_nothing_else(tiny):
    _, _, tokenizer = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wins Nim with 8 stones?"},
        {"role": "assistant", "content": "The second player."},
        {"role": "user", "content": "And with 9?"},
        {"role": "assistant", "content": "The first player, taking 1 stone."},
    ]
    row = chatml_row(messages, tokenizer)
    decoded = [tokenizer.decode(s, skip_special_tokens=True) for s in labelled_spans(row)]
    assert decoded == ["The second player.", "The first player, taking 1 stone."]
    everything = chatml_row(messages, tokenizer, train_on_inputs=True)
    assert everything.labels == everything.input_ids


def test_parquet_rows_are_taken_as_they_are(tmp_path: Path):
    table = pa.table(
        {
            "input_ids": [[5, 6, 7, 8, 0], [9, 10, 11]],
            "attention_mask": [[1, 1, 1, 1, 0], [1, 1, 1]],
            "labels": [[-100, -100, 7, 8, -100], [-100, 10, 11]],
        }
    )
    path = tmp_path / "train_harmony.parquet"
    pq.write_table(table, path)
    rows = parquet_rows(path, vocab_size=100)
    assert rows == [TokenRow([5, 6, 7, 8], [-100, -100, 7, 8]), TokenRow([9, 10, 11], [-100, 10, 11])]
    with pytest.raises(ValueError, match=r"train_harmony.parquet:1: token id 8 is outside"):
        parquet_rows(path, vocab_size=8)


def test_truncate_drops_rows_without_targets():
    rows = [TokenRow([1, 2, 3, 4], [IGNORE, IGNORE, IGNORE, 4]), TokenRow([1, 2, 3], [IGNORE, 2, 3])]
    assert truncate(rows, 3) == [TokenRow([1, 2, 3], [IGNORE, 2, 3])]


def test_packing_keeps_rows_independent(tiny):
    """The loss of a packed block equals the sum of its rows' losses computed one by one.

    With a cache (or without position-id resets) later rows would attend to earlier ones and the
    losses would differ.
    """
    fold, model, tokenizer = tiny
    rows = read_rows(fold / "val.jsonl", tokenizer)[:3]
    blocks = pack(rows, seq_length=4096, packing=True)
    assert len(blocks) == 1 and len(blocks[0]) == 3
    packed = collate(blocks, tokenizer.pad_token_id, packing=True)
    starts = [0, len(rows[0].input_ids), len(rows[0].input_ids) + len(rows[1].input_ids)]
    assert packed.position_ids[0, starts].tolist() == [0, 0, 0]
    with torch.no_grad():
        packed_loss, packed_n = batch_loss(model, packed)
        singles = [batch_loss(model, collate([[r]], tokenizer.pad_token_id, packing=False)) for r in rows]
    assert packed_n == sum(n for _, n in singles)
    assert float(packed_loss) == pytest.approx(sum(float(loss) for loss, _ in singles), rel=1e-5)


def test_padded_batch_matches_single_rows(tiny):
    fold, model, tokenizer = tiny
    rows = read_rows(fold / "val.jsonl", tokenizer)[:3]
    batch = collate(pack(rows, 4096, packing=False), tokenizer.pad_token_id, packing=False)
    assert batch.attention_mask is not None and batch.input_ids.shape[0] == 3
    with torch.no_grad():
        loss, n = batch_loss(model, batch)
        singles = [batch_loss(model, collate([[r]], tokenizer.pad_token_id, packing=False)) for r in rows]
    assert n == sum(k for _, k in singles)
    assert float(loss) == pytest.approx(sum(float(s) for s, _ in singles), rel=1e-5)


def test_attention_bias_pattern():
    """Packed rows see only their own earlier tokens; padding keys are never seen; plain causal needs no mask."""
    packed = attention_bias(torch.tensor([[0, 1, 2, 0, 1, 0]]), None, torch.float32)
    seen = (packed[0, 0] == 0).int().tolist()
    assert seen == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert set(packed.unique().tolist()) == {0.0, float("-inf")}
    padded = attention_bias(torch.tensor([[0, 1, 2, 0]]), torch.tensor([[1, 1, 1, 0]]), torch.float32)
    assert (padded[0, 0] == 0).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert attention_bias(torch.tensor([[0, 1, 2], [0, 1, 2]]), None, torch.float32) is None


@pytest.mark.parametrize("packing", [True, False])
def test_batch_loss_matches_the_models_own_loss(tiny, packing):
    """The sparse head with epochwise's shared float mask gives transformers' own loss (its mask, full logits)."""
    fold, model, tokenizer = tiny
    rows = read_rows(fold / "val.jsonl", tokenizer)[:6]
    batch = collate(pack(rows, 300, packing=packing)[:3], tokenizer.pad_token_id, packing=packing)
    assert batch.input_ids.shape[0] == 3
    with torch.no_grad():
        loss, n = batch_loss(model, batch)
        reference = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            use_cache=False,
        ).loss
    assert n == batch.label_tokens
    assert float(loss) / n == pytest.approx(float(reference), rel=1e-5)


def test_tiny_base_is_cached_by_content(tmp_path: Path):
    fold = example_fold(tmp_path / "games")
    local = local_config(tmp_path)
    first = build_tiny(fold, local)
    assert build_tiny(fold, local) == first
    other = local.model_copy(update={"tiny": TEST_TINY.model_copy(update={"hidden_size": 32})})
    assert build_tiny(fold, other) != first
