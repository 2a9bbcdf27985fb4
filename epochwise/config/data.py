"""How JSON records become ChatML conversations, and how a fold is split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from epochwise.config.base import Section
from epochwise.io import DEFAULT_MAX_LINE_BYTES as MAX_LINE_BYTES


class RecordMapping(Section):
    """Maps one input record to a fold row: ChatML ``messages`` (SFT), a preference row (DPO) or a
    prompt row (GRPO).

    ``auto`` uses a record's own ``messages`` or ``prompt``/``completion`` when it has them and the
    template otherwise; ``template``, ``messages`` and ``prompt_completion`` force one reading of a chat
    row. ``preference`` writes Together's preference rows (``train_dpo.jsonl``): the input is the system
    prompt and the user template (or the record's own ``messages``), the preferred and rejected replies
    come from ``chosen_field`` and ``rejected_field``. ``prompt`` writes GRPO prompt rows
    (``train_grpo.jsonl``): the same input as ``messages`` plus the record fields named in ``columns``,
    which reach the reward functions by name.
    """

    format: Literal["auto", "template", "messages", "prompt_completion", "preference", "prompt"] = Field(
        "auto",
        description="How to read each record: auto | template | messages | prompt_completion (chat rows), "
        "preference (DPO rows) or prompt (GRPO prompt rows).",
    )
    system_prompt: str | None = Field(None, description="System message put first in every conversation.")
    user_template: str | None = Field(
        None,
        description="User message with {field} placeholders filled from the record, e.g. "
        "'Generate a detailed socialized context for the following story:\\n\\n{story}'.",
    )
    assistant_field: str | None = Field(
        None, description="Record field holding the reply; a dict or list is written as compact JSON."
    )
    chosen_field: str | None = Field(
        None, description="format: preference: record field holding the preferred reply (compact JSON if not text)."
    )
    rejected_field: str | None = Field(
        None, description="format: preference: record field holding the rejected reply (compact JSON if not text)."
    )
    columns: list[str] = Field(
        default_factory=list,
        description="format: prompt: record fields copied into each prompt row as columns; GRPO reward "
        "functions receive them by name (e.g. [answer]).",
    )

    @field_validator("columns")
    @classmethod
    def _plain_columns(cls, value: list[str]) -> list[str]:
        for name in value:
            if name == "messages" or not name.isidentifier():
                raise ValueError(f"column {name!r}: a column is a plain field name other than 'messages'")
        if len(set(value)) != len(value):
            raise ValueError("columns are named twice")
        return value


class DataConfig(Section):
    """Everything `prepare` needs besides the input and output paths."""

    mapping: RecordMapping = Field(default_factory=RecordMapping)
    val_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of records in val.jsonl.")
    seed: int = Field(42, description="Seed of the content-hash split (same seed + content = same split).")
    strict: bool = Field(
        False, description="Fail on records that cannot be mapped instead of skipping them with a reason."
    )
    max_line_bytes: int = Field(
        MAX_LINE_BYTES,
        gt=0,
        description="Longest accepted JSONL line in bytes (64 MiB), in records, validation and conversion.",
    )
