"""The base of every configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A configuration section: its validator is built on first use, not at import.

    The CLI reads the sections' field descriptions and defaults for its help at import time; building
    ten validators there (and pydantic's scan of every installed package for plugins) cost more than
    the rest of ``epochwise --help`` (bench/cli_start.py). Validation itself is unchanged.
    """

    model_config = ConfigDict(defer_build=True)
