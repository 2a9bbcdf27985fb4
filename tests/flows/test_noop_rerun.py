"""A rerun of a finished Together fold costs one hash per file: no second hash, no validation, no
upload, no job, no redrawn report (real flow, real SDK, the fake Together).

Hashes are counted at ``hashlib.sha256`` and validations at the SDK's ``check_file`` (both wrapped,
the real functions still run), never by replacing the project's code.
"""

from __future__ import annotations

import json
from pathlib import Path

from epochwise.fold import Fold
from epochwise.report import PICTURE_FILE, REPORT_DIR, REPORT_FILE
from epochwise.validation_record import RECORD_FILE
from flows.epoch_train import epoch_train
from tests.helpers import FAST, FileHashCounter, count_check_file, make_fold, train_cfg


def stats(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_a_noop_rerun_hashes_each_file_once_and_validates_uploads_and_draws_nothing(
    fake_together, tmp_path, monkeypatch
):
    fold = make_fold(tmp_path, "games", "noop-rerun", n_train=40, n_val=8)
    where = Fold.of(fold)
    checked = count_check_file(monkeypatch)
    hashes = FileHashCounter(monkeypatch, where.train, where.val)
    first = epoch_train(str(fold), train_cfg(2), FAST)
    # Ours once per file; the SDK's own check before each upload is skipped (same bytes, same check),
    # and the fake checks each upload server-side, as Together does.
    assert sorted(checked) == ["train.jsonl", "upload.jsonl", "upload.jsonl", "val.jsonl"]
    assert json.loads((fold / RECORD_FILE).read_text())["passed"]
    report = [fold / REPORT_DIR / REPORT_FILE, fold / REPORT_DIR / PICTURE_FILE]
    drawn = [stats(p) for p in report]
    calls, jobs, uploads = dict(fake_together.counts), len(fake_together.state.jobs), fake_together.state.uploads

    hashes.reset()
    again = epoch_train(str(fold), train_cfg(2), FAST)

    assert [r.job_id for r in again] == [r.job_id for r in first]
    assert hashes.of(where.train) == 1 and hashes.of(where.val) == 1  # upload keys, validation, report: one pass
    assert len(checked) == 4  # the rerun validated nothing again
    assert (len(fake_together.state.jobs), fake_together.state.uploads) == (jobs, uploads)
    assert not [k for k in fake_together.counts if k.startswith("POST") and fake_together.counts[k] != calls.get(k)]
    assert [stats(p) for p in report] == drawn  # the same report: not redrawn, not rewritten


def test_a_changed_fold_is_validated_and_hashed_anew(fake_together, tmp_path, monkeypatch):
    fold = make_fold(tmp_path, "games", "noop-changed", n_train=40, n_val=8)
    checked = count_check_file(monkeypatch)
    epoch_train(str(fold), train_cfg(1), FAST)
    train = Fold.of(fold).train
    train.write_bytes(train.read_bytes().replace(b"fold noop-changed", b"fold noop-changed-2"))

    again = epoch_train(str(fold), train_cfg(1), FAST)

    # only the changed file, validated once by us (and once by the fake, server-side)
    assert [c for c in checked if c != "upload.jsonl"] == ["train.jsonl", "val.jsonl", "train.jsonl"]
    assert fake_together.state.uploads == 3 and len(fake_together.state.jobs) == 2
    assert again[0].job_id == fake_together.state.jobs_in_order()[-1].id
