"""Prefect task for the Harmony step: a ChatML fold -> gpt-oss token parquet (or the parquet already there).

The cache is the manifest `epochwise.harmony.convert_fold` writes beside its outputs
(``<fold>/harmony/manifest.json``: conversion key + the outputs' sha256), not a Prefect cache record:

- the key must hash the *content* of ``train.jsonl``/``val.jsonl`` (Prefect's INPUTS policy would hash
  the path string), plus settings and the openai-harmony version;
- a Prefect record lives in result storage and would still answer "cached" after the parquet files were
  deleted or edited, while the manifest is checked against the files themselves;
- ``epochwise convert`` reuses the same cache without starting Prefect.

So the task itself is ``NO_CACHE``; a rerun costs four sha256 passes (about 1.5 GB/s) when nothing changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from epochwise.config.data import MAX_LINE_BYTES
from epochwise.config.harmony import HarmonyConfig
from epochwise.harmony import convert_fold


@task(cache_policy=NO_CACHE)
def convert_fold_to_harmony(fold: str, config: HarmonyConfig, max_line_bytes: int = MAX_LINE_BYTES) -> dict[str, Any]:
    """Write (or reuse) ``<fold>/harmony/{train,val}_harmony.parquet``.

    Returns ``{"train": path, "val": path or None, "manifest", "key", "cached", "rows", "tokens",
    "labelled_tokens", "longest", "over_max", "dropped", "truncated", "untrained", "splits", "settings"}``
    with absolute paths. Raises `epochwise.problems.InputError` (``path:line: reason``) on bad or
    overlong rows before any output is replaced.
    """
    return convert_fold(Path(fold), config, max_line_bytes=max_line_bytes).as_dict()
