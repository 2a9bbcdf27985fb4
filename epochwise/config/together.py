"""How epochwise talks to Together (not secrets: those live in blocks or the environment)."""

from __future__ import annotations

from pydantic import BaseModel


class TogetherConfig(BaseModel):
    """Together API behaviour: polling, deadlines, retries."""
