"""A fold: one directory holding ``train.jsonl`` and ``val.jsonl`` (and, for gpt-oss, their Harmony
parquet under ``harmony/``), and the names derived from it.

Flows take a fold as a path string (a deployment parameter must be JSON) and build one `Fold` from it;
everything that names the fold (artifact keys, job suffixes, endpoint names, locks) reads it from there.

    Fold.of("folds/games").name == "games"
    Fold.of(".").name            # the current directory's own name, not ""

`discover_folds` lists the folds under a folds root (``epochwise deployments apply`` and the
``nightly-folds`` flow, which looks again at run time so a fold added after the last apply is trained too).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from epochwise.artifacts import artifact_key

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
# The (train, val) files of each training method. DPO and GRPO rows have their own names so that one
# fold can hold the chat rows of its SFT epochs beside the preference or prompt rows of the epochs that
# continue the same chain with another method (``sft -> dpo``); `Fold.files` falls back to
# train.jsonl / val.jsonl when a method's own files are absent (a fold of one method only).
METHOD_FILES: dict[str, tuple[str, str]] = {
    "sft": (TRAIN_FILE, VAL_FILE),
    "dpo": ("train_dpo.jsonl", "val_dpo.jsonl"),
    "grpo": ("train_grpo.jsonl", "val_grpo.jsonl"),
}
HARMONY_DIR = "harmony"
TRAIN_PARQUET = "train_harmony.parquet"
VAL_PARQUET = "val_harmony.parquet"

SLUG_MAX = 20


def fold_slug(name: str) -> str:
    """A fold name as Together names carry it (job suffixes, endpoints, locks): lowercase letters,
    digits and dashes, at most 20 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:SLUG_MAX].strip("-") or "fold"


@dataclass(frozen=True)
class Fold:
    """One fold directory and what is derived from it (nothing here touches the disk)."""

    directory: Path

    @classmethod
    def of(cls, path: Path | str) -> Fold:
        return cls(Path(path))

    @property
    def name(self) -> str:
        """The directory's own name, with ``.`` and ``..`` resolved lexically (``folds/games`` -> ``games``).

        Symlinks are not followed: a fold reached through a link keeps the link's name, so its job
        suffixes, endpoint names and artifact keys stay what they were.
        """
        return Path(os.path.abspath(self.directory)).name

    @property
    def slug(self) -> str:
        return fold_slug(self.name)

    def artifact_key(self, kind: str) -> str:
        """``<name>-<kind>``, e.g. ``games-epochs``."""
        return artifact_key(self.name, kind)

    @property
    def train(self) -> Path:
        return self.directory / TRAIN_FILE

    @property
    def val(self) -> Path:
        return self.directory / VAL_FILE

    @property
    def jsonl(self) -> list[str]:
        """``[train.jsonl, val.jsonl]`` as strings (what the validate task takes)."""
        return [str(self.train), str(self.val)]

    def files(self, method: str = "sft") -> tuple[Path, Path]:
        """``(train, val)`` that ``method`` trains on: its own files (`METHOD_FILES`, e.g.
        ``train_dpo.jsonl``) when the train one exists, else ``train.jsonl`` / ``val.jsonl``."""
        train, val = (self.directory / name for name in METHOD_FILES[method])
        if method != "sft" and not train.is_file():
            return self.train, self.val
        return train, val

    def jsonl_for(self, method: str = "sft") -> list[str]:
        """`files` as strings (what the validate task takes)."""
        return [str(p) for p in self.files(method)]

    @property
    def harmony(self) -> dict[str, Path]:
        """``{"train": ..., "val": ...}``: the Harmony token parquet a gpt-oss fold trains on."""
        out = self.directory / HARMONY_DIR
        return {"train": out / TRAIN_PARQUET, "val": out / VAL_PARQUET}

    def __str__(self) -> str:
        return str(self.directory)


def discover_folds(folds_root: Path | str) -> list[Path]:
    """Absolute fold directories under ``folds_root`` (each direct sub-directory holding a ``train.jsonl``),
    sorted by name; hidden directories are ignored."""
    root = Path(folds_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folds root is not a directory: {root}")
    return sorted(
        child
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and (child / TRAIN_FILE).is_file()
    )
