"""Names of the Prefect artifacts epochwise publishes (keys: lowercase letters, digits and dashes)."""

from __future__ import annotations

import re


def artifact_key(fold: str, kind: str) -> str:
    """``<fold>-<kind>``, e.g. ``games-epochs``; other characters become dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{fold}-{kind}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", slug)
