"""The local PyTorch + PEFT LoRA backend.

- `keys`: run keys, the on-disk layout and the Prefect cache key (no torch: the flows import it);
- `models`: the ``tiny`` / ``smollm2`` / HF bases and their tokenizers, built once and cached;
- `data`: ChatML -> tokens with assistant-only labels, parquet rows, packing, micro batches;
- `trainer`: one epoch with exact mid-epoch resume (`train_epoch`);
- `export`: find, export and sample finished epochs (``epochwise export`` / ``epochwise sample``).

Importing this package does not import torch; `data`, `models` and `trainer` do.
"""
