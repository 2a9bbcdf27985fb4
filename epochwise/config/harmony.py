"""Settings of the Harmony conversion that turns a ChatML fold into token parquet for gpt-oss models."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from epochwise.config.base import Section


class HarmonyConfig(Section):
    """How ``epochwise convert --format harmony`` renders, limits and parallelises a fold.

    ``reasoning_effort``, ``max_seq_length`` and ``overlong`` change the written tokens and are part of
    the conversion cache key; ``vocab_dir`` and ``workers`` do not (the vocab file is verified by its
    sha256, and the worker count never changes the output).
    """

    reasoning_effort: Literal["low", "medium", "high"] = Field(
        "medium",
        description="'Reasoning: <effort>' in the Harmony system message; 'medium' is what gpt-oss assumes "
        "at inference when a request names none.",
    )
    max_seq_length: int = Field(8192, gt=0, description="Longest row in tokens; longer rows are handled by 'overlong'.")
    overlong: Literal["error", "drop", "truncate"] = Field(
        "error",
        description="Rows over max_seq_length: 'error' lists their source lines and writes nothing, 'drop' "
        "leaves them out, 'truncate' cuts them to max_seq_length tokens (a row left with no trained token "
        "is dropped).",
    )
    vocab_dir: Path | None = Field(
        None,
        description="Directory holding o200k_base.tiktoken; default: unpacked once from the bpe-openai "
        "package into the user cache (~/.cache/epochwise/tiktoken). Nothing is ever downloaded.",
    )
    workers: int = Field(
        1,
        ge=0,
        description="Processes that render conversations: 1 = this process, 0 = one per CPU core. A pool "
        "costs about a second per worker to start and is used only for folds of 2,000 rows or more; on the "
        "shared 2-core machine it was slower than one process (bench/convert.py), so it is opt-in.",
    )
