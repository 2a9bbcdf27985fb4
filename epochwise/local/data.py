"""Rows -> token ids and labels -> packed micro batches for the local trainer.

Labels are -100 everywhere except the assistant replies (each reply's tokens plus its end-of-turn
token), found by the prefix-difference method: render the conversation up to each assistant turn
with ``add_generation_prompt=True`` and up to the end of that turn; the characters in between are the
reply. This works with any template that renders earlier turns identically (ChatML, Qwen, Llama-3),
unlike ``return_assistant_tokens_mask`` which needs ``{% generation %}`` markers the shipped templates
lack. Harmony parquet rows (``input_ids``/``attention_mask``/``labels``) already carry labels and are
taken as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch

IGNORE = -100  # label of tokens that do not count in the loss (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class TokenRow:
    """One conversation as token ids with its labels (same length)."""

    input_ids: list[int]
    labels: list[int]


def chatml_row(messages: list[dict[str, str]], tokenizer, train_on_inputs: bool = False) -> TokenRow:
    """Tokenise one conversation with the model's chat template; only assistant replies are labelled."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []  # character ranges of the replies inside ``text``
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the chat template does not render earlier turns identically; "
                "cannot find the assistant reply by prefix difference"
            )
        # The reply and its end-of-turn marker; the newline the template adds after it is not labelled.
        spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    if train_on_inputs:
        return TokenRow(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for index, (start, _end) in enumerate(encoded["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[index] = ids[index]
    return TokenRow(ids, labels)


def read_rows(path: Path | str, tokenizer, train_on_inputs: bool = False) -> list[TokenRow]:
    """All rows of a ChatML JSONL or Harmony parquet file, tokenised for ``tokenizer``'s model."""
    path = Path(path)
    if path.suffix == ".parquet":
        return parquet_rows(path, len(tokenizer))
    rows = []
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                rows.append(chatml_row(orjson.loads(line)["messages"], tokenizer, train_on_inputs))
    return rows


def parquet_rows(path: Path | str, vocab_size: int) -> list[TokenRow]:
    """Pre-tokenised rows (``input_ids``, ``attention_mask``, ``labels``), padding dropped.

    The ids must belong to the model's vocabulary (Harmony parquet is o200k: gpt-oss models).
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids", "attention_mask", "labels"]).to_pydict()
    rows = []
    for number, (ids, mask, labels) in enumerate(
        zip(table["input_ids"], table["attention_mask"], table["labels"], strict=True), start=1
    ):
        keep = [i for i, m in enumerate(mask) if m]
        row_ids = [ids[i] for i in keep]
        if row_ids and max(row_ids) >= vocab_size:
            raise ValueError(
                f"{path}:{number}: token id {max(row_ids)} is outside the model's vocabulary "
                f"({vocab_size}); this parquet was tokenised for another model"
            )
        rows.append(TokenRow(row_ids, [labels[i] for i in keep]))
    return rows


def truncate(rows: Iterable[TokenRow], max_len: int) -> list[TokenRow]:
    """Cut rows to ``max_len`` tokens; rows left with no labelled token are dropped (nothing to learn)."""
    out = []
    for row in rows:
        cut = TokenRow(row.input_ids[:max_len], row.labels[:max_len])
        if any(label != IGNORE for label in cut.labels[1:]):
            out.append(cut)
    return out


def shuffled(rows: list[TokenRow], seed: int) -> list[TokenRow]:
    """A permutation that depends only on ``seed`` (its own generator: global RNG state is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]


def pack(rows: Iterable[TokenRow], seq_length: int, packing: bool) -> list[list[TokenRow]]:
    """Group rows into blocks of at most ``seq_length`` tokens, in order (one row per block without packing)."""
    blocks: list[list[TokenRow]] = []
    current: list[TokenRow] = []
    used = 0
    for row in rows:
        if current and (not packing or used + len(row.input_ids) > seq_length):
            blocks.append(current)
            current, used = [], 0
        current.append(row)
        used += len(row.input_ids)
    if current:
        blocks.append(current)
    return blocks


@dataclass
class Batch:
    """Tensors of one micro batch. ``attention_mask`` is None for packed batches: the position-id
    resets then give a block-diagonal causal mask (with ``use_cache=False``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    tokens: int  # real (non-padding) tokens
    label_tokens: int  # tokens that count in the loss (targets after the shift)

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            move(self.attention_mask),
            self.tokens,
            self.label_tokens,
        )


def collate(blocks: list[list[TokenRow]], pad_id: int, packing: bool) -> Batch:
    """Right-pad blocks to the longest one; padding is its own position-id segment and never labelled."""
    width = max(sum(len(r.input_ids) for r in block) for block in blocks)
    ids, labels, positions, mask = [], [], [], []
    tokens = 0
    for block in blocks:
        row_ids: list[int] = []
        row_labels: list[int] = []
        row_pos: list[int] = []
        for row in block:
            row_ids += row.input_ids
            # A row's first label is never a target after the shift, so packed rows cannot leak into
            # each other's loss; the first token of each row is masked anyway for clarity.
            row_labels += [IGNORE] + row.labels[1:]
            row_pos += range(len(row.input_ids))
        pad = width - len(row_ids)
        tokens += len(row_ids)
        mask.append([1] * len(row_ids) + [0] * pad)
        ids.append(row_ids + [pad_id] * pad)
        labels.append(row_labels + [IGNORE] * pad)
        positions.append(row_pos + list(range(pad)))
    label_tensor = torch.tensor(labels)
    return Batch(
        input_ids=torch.tensor(ids),
        labels=label_tensor,
        position_ids=torch.tensor(positions),
        attention_mask=None if packing else torch.tensor(mask),
        tokens=tokens,
        label_tokens=int((label_tensor[:, 1:] != IGNORE).sum()),
    )


def micro_batches(blocks: list[list[TokenRow]], size: int, pad_id: int, packing: bool) -> Iterator[Batch]:
    for start in range(0, len(blocks), size):
        yield collate(blocks[start : start + size], pad_id, packing)
