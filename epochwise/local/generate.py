"""Batched greedy generation from a local epoch's adapter (what ``epochwise evaluate`` scores).

Prompts are left-padded so every row's reply starts at the same position; the model gets the attention
mask, and HF generation derives position ids from it, so a padded row gets the reply it would get alone.
The model of the most recent epoch stays loaded (one evaluation generates many chunks of one epoch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.lru_cache(maxsize=1)
def _loaded(adapter_dir: str, base_model: str):
    from epochwise.local.export import load_epoch

    return load_epoch({"adapter_dir": adapter_dir, "base_model": base_model})


def generate_batch(
    adapter_dir: str, base_model: str, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int
) -> list[str]:
    """Greedy replies (special tokens removed) to each conversation, all in one forward batch."""
    import torch

    model, tokenizer = _loaded(adapter_dir, base_model)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    start = encoded["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in output]
