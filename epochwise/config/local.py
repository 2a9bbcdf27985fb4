"""Settings of the local PyTorch + PEFT trainer (owned by the local-backend work; see issue 5)."""

from __future__ import annotations

from pydantic import BaseModel


class LocalConfig(BaseModel):
    """Local trainer settings beyond the shared `HyperParams`."""
