"""``evaluate-epochs`` on the local backend: the example records split into two folds, 2 epochs of the tiny
model on one, each epoch scored on both folds' held-out rows (table, heatmap, artifacts); an evaluation
interrupted by a failing metric resumes generating only the rows not generated yet; ``deploy --epoch
best-eval`` deploys the epoch with the best mean."""

from __future__ import annotations

import json
import sys

import pytest
from prefect.artifacts import Artifact
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config import DataConfig, load_settings
from epochwise.config.evaluate import EvaluateConfig
from epochwise.config.train import HyperParams, TrainConfig
from epochwise.evaluate import EvaluationError, best_eval_epoch
from epochwise.prepare import prepare
from epochwise.records import read_records
from flows.epoch_train import epoch_train
from flows.evaluate_epochs import evaluate_epochs
from tests.helpers import EXAMPLE_RECORDS, REPO, local_config

HYPER = HyperParams(learning_rate=2e-3, lr_scheduler="cosine", warmup_ratio=0.1, min_lr_ratio=0.1)
ROWS, BATCH = 4, 2  # rows scored per eval fold, rows per generate() batch (= per cached chunk)
METRICS_MODULE = """
calls = 0

def overlap(reply, target):
    # share of the target's distinct characters that the reply uses: varies between epochs
    return len(set(reply) & set(target)) / max(1, len(set(target)))

def flaky(reply, target):
    global calls
    calls += 1
    if calls > 5:
        raise RuntimeError("metric service down")
    return 0.0
"""


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """Folds ``ga`` and ``gb`` (alternate example records, different split seeds) and 2 epochs trained on ``ga``."""
    root = tmp_path_factory.mktemp("evaluate")
    records = read_records(EXAMPLE_RECORDS).records
    data = load_settings(REPO / "epochwise.yaml", records_file=EXAMPLE_RECORDS / "epochwise.yaml").data
    for name, part, seed in (("ga", records[0::2], 1), ("gb", records[1::2], 2)):
        prepare(part, root / "folds" / name, DataConfig(**{**data.model_dump(), "seed": seed, "val_ratio": 0.05}))
    local = local_config(root)
    train = TrainConfig(backend="local", epochs=2, local_model="tiny", hyper=HYPER)
    records = epoch_train(str(root / "folds" / "ga"), train=train, local=local)
    assert [r.epoch for r in records] == [1, 2]
    (root / "ew_eval_metrics.py").write_text(METRICS_MODULE)
    sys.path.insert(0, str(root))
    yield root / "folds" / "ga", str(root / "folds" / "*")
    sys.path.remove(str(root))
    sys.modules.pop("ew_eval_metrics", None)


def settings(**changes) -> EvaluateConfig:
    return EvaluateConfig(**{"max_rows": ROWS, "batch_size": BATCH, "max_new_tokens": 8, **changes})


def test_two_epochs_on_two_folds_give_the_table_heatmap_and_artifacts(folds):
    fold, on = folds
    metrics = ["ew_eval_metrics:overlap", "exact", "contains", "json-field:game", "labels"]
    summary = evaluate_epochs(str(fold), [on], settings(metrics=metrics))

    rows = summary["rows"]
    names = ["ew_eval_metrics:overlap", "exact", "contains", "json-field:game", "accuracy", "precision", "recall", "f1"]
    assert {(r["epoch"], r["eval fold"], r["metric"]) for r in rows} == {
        (e, f, m) for e in (1, 2) for f in ("ga", "gb") for m in names
    }
    assert len(rows) == 2 * 2 * len(names)
    assert all(0.0 <= r["value"] <= 1.0 and r["rows"] == ROWS for r in rows)
    assert any(r["value"] > 0 for r in rows if r["metric"] == "ew_eval_metrics:overlap")
    assert [(r["generated"], r["reused"]) for r in summary["results"]] == [(ROWS, 0)] * 4
    assert summary["best_eval_epoch"] == best_eval_epoch(rows) and summary["metric"] == "ew_eval_metrics:overlap"

    png = (fold / "evaluation" / "heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and summary["heatmap"] == str(fold / "evaluation" / "heatmap.png")
    assert json.loads((fold / "evaluation" / "table.json").read_text()) == rows
    assert json.loads(Artifact.get("ga-evaluation").data) == rows
    assert "data:image/png;base64," in Artifact.get("ga-evaluation-heatmap").data
    assert not list((fold / "evaluation").glob(".*tmp*"))  # written atomically: no temporary left

    again = evaluate_epochs(str(fold), [on], settings(metrics=["exact"]))  # another metric: nothing generated
    assert [(r["generated"], r["reused"]) for r in again["results"]] == [(0, ROWS)] * 4
    assert [r["value"] for r in again["rows"]] == [r["value"] for r in rows if r["metric"] == "exact"]


def test_an_interrupted_evaluation_generates_only_the_missing_rows(folds):
    fold, on = folds
    fresh = settings(max_new_tokens=6)  # another generation setting: a cache of its own
    with pytest.raises(
        EvaluationError,
        match=r"metric ew_eval_metrics:flaky failed on .*ga/val.jsonl:\d+: "
        r"RuntimeError: metric service down",
    ):
        evaluate_epochs(str(fold), [on], fresh.model_copy(update={"metrics": ["ew_eval_metrics:flaky"]}))
    # 2 calls checked each fold's first row; epoch 1 on ga then scored 3 rows and failed on the 4th,
    # after its second chunk had been generated: 2 chunks (4 rows) are cached, the other 12 rows are not.
    summary = evaluate_epochs(str(fold), [on], fresh.model_copy(update={"metrics": ["exact"]}))
    assert [(r["epoch"], r["fold"], r["generated"], r["reused"]) for r in summary["results"]] == [
        (1, "ga", 0, ROWS),
        (1, "gb", ROWS, 0),
        (2, "ga", ROWS, 0),
        (2, "gb", ROWS, 0),
    ]


def test_cli_evaluate_and_deploy_best_eval(folds, monkeypatch):
    fold, on = folds
    monkeypatch.setenv("EPOCHWISE_EVALUATE__BATCH_SIZE", str(BATCH))
    runner = CliRunner()
    bad = runner.invoke(app, ["evaluate", str(fold), "--on", on, "--metric", "bleu"])
    assert bad.exit_code == 1 and "not one of exact, contains, labels" in bad.output and "Traceback" not in bad.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(fold),
            "--on",
            on,
            "--epochs",
            "1,2",
            "--max-rows",
            str(ROWS),
            "--max-new-tokens",
            "8",
            "--metric",
            "ew_eval_metrics:overlap",
            "-m",
            "exact",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(Artifact.get("ga-evaluation").data)
    best = best_eval_epoch(rows)
    assert f"best-eval epoch {best}; replies generated 0, from cache {4 * ROWS}" in result.output
    assert "heatmap:" in result.output
    deployed = runner.invoke(app, ["deploy", str(fold), "--epoch", "best-eval"])
    assert deployed.exit_code == 0, deployed.output
    assert f"exported epoch {best} to" in deployed.output
