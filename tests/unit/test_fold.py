"""`epochwise.fold.Fold`: the one place a fold's name, slug, artifact keys and file paths come from."""

from __future__ import annotations

import os
from pathlib import Path

from epochwise import endpoints_api as ea
from epochwise import together_api as api
from epochwise.fold import Fold, fold_slug


def test_the_name_is_the_directory_name_also_for_dot_and_trailing_slashes(tmp_path, monkeypatch):
    assert (
        Fold.of("folds/games").name == Fold.of("folds/games/").name == Fold.of(Path("/srv/folds/games")).name == "games"
    )
    work = tmp_path / "chess"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert Fold.of(".").name == "chess"  # Path(".").name would be ""
    assert Fold.of("sub/..").name == "chess"


def test_a_fold_reached_through_a_link_keeps_the_links_name(tmp_path):
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "games")
    assert Fold.of(tmp_path / "games").name == "games"  # its job suffixes and endpoints stay what they were


def test_slug_artifact_keys_and_together_names_come_from_the_fold_name():
    fold = Fold.of("folds/Games & Puzzles: the long fold name")
    assert fold.slug == fold_slug(fold.name) == "games-puzzles-the-lo"
    assert fold.artifact_key("epochs") == "games-puzzles-the-long-fold-name-epochs"
    assert api.epoch_suffix(fold.name, 2, "ab" * 32) == f"ew-{fold.slug}-e2-abababab"
    assert ea.endpoint_slug(fold.name, 2) == f"ew-{fold.slug}-e2"
    assert fold_slug("!!!") == "fold"


def test_file_paths():
    fold = Fold.of("folds/games")
    assert fold.jsonl == [str(Path("folds/games/train.jsonl")), str(Path("folds/games/val.jsonl"))]
    assert fold.harmony == {
        "train": Path("folds/games/harmony/train_harmony.parquet"),
        "val": Path("folds/games/harmony/val_harmony.parquet"),
    }
