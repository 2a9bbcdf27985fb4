"""``epochwise train`` prints the plan first and leaves the ``<fold>-report`` artifact and report files."""

from __future__ import annotations

import base64
import json

from prefect.artifacts import Artifact
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config import load_settings
from flows.prepare_fold import prepare_fold
from tests.fake_together.server import FakeTogether
from tests.helpers import EXAMPLE_RECORDS, REPO

BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"


def test_train_prints_the_plan_then_reports_loss_curve_and_lineage(fake_together: FakeTogether, tmp_path, monkeypatch):
    for field, value in {"POLL_INITIAL_S": "0.005", "POLL_MAX_S": "0.02", "FILE_POLL_S": "0.005"}.items():
        monkeypatch.setenv(f"EPOCHWISE_TOGETHER__{field}", value)
    fold = tmp_path / "reportfold"
    runner = CliRunner()
    config = ["--config", str(REPO / "epochwise.yaml")]
    prepare_fold(str(EXAMPLE_RECORDS), str(fold), load_settings(REPO / "epochwise.yaml").data)

    result = runner.invoke(
        app, ["train", str(fold), "--backend", "together", "--base-model", BASE, "--epochs", "2", *config]
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "reportfold: plan for 2 epoch(s)" in out and "estimate, bytes/4" in out
    jobs = fake_together.state.jobs_in_order()
    assert len(jobs) == 2

    artifact = Artifact.get("reportfold-report")
    assert artifact is not None and artifact.type == "markdown"
    md = artifact.data
    prefix = "](data:image/png;base64,"
    assert prefix in md
    png = base64.b64decode(md.split(prefix, 1)[1].split(")", 1)[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # lineage: the prepare run's records hash -> fold file hashes -> file ids -> jobs -> models
    prepare_rows = json.loads(Artifact.get("reportfold-prepare").data)
    assert prepare_rows[0]["records sha256"][:12] in md
    for f in fake_together.state.files.values():
        assert f.id in md
    for job in jobs:
        assert job.id in md and job.output_name in md
    assert "price so far: $3.00" in md  # the fake prices 1.50 per epoch

    written = fold / "report" / "report.md"
    assert written.is_file() and (fold / "report" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = written.read_text()
    assert "](loss.png)" in text and jobs[1].id in text and "data:image" not in text
