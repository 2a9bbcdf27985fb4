"""Which folds exist under a folds root: every direct sub-directory holding a ``train.jsonl``.

Used by ``epochwise deployments apply`` (one ``epoch-train/<fold>`` deployment per fold) and by the
``nightly-folds`` flow (which looks again at run time, so a fold added after the last apply is trained too).
"""

from __future__ import annotations

from pathlib import Path

from epochwise.fold import TRAIN_FILE


def discover_folds(folds_root: Path | str) -> list[Path]:
    """Absolute fold directories under ``folds_root``, sorted by name; hidden directories are ignored."""
    root = Path(folds_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folds root is not a directory: {root}")
    return sorted(
        child
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and (child / TRAIN_FILE).is_file()
    )
