"""End to end with real processes, the way a user runs epochwise for real:

    prefect server start                                    (fixture: temp PREFECT_HOME, SQLite, free port)
    epochwise prepare examples/records/games --fold folds/games
    epochwise deployments apply --folds-root folds          (twice: idempotent)
    prefect worker start --pool epochwise
    prefect deployment run epoch-train/games                (local backend, tiny model, 1 epoch)

then the ``games-epochs`` artifact through the API, the UI page of the run in headless Chromium, one
fold never running twice at once, and ``nightly-folds`` training two folds (one of them added after the
last apply, by the ``prepare-fold/any`` deployment).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.apply import CRASH_AUTOMATION
from tests.e2e.processes import Prefect, Worker, start_worker, stop, tail

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "examples" / "records" / "games"
UUID = re.compile(r"UUID: ([0-9a-f-]{36})")

# The repository's epochwise.yaml (the split; the example records carry their own mapping) plus fast
# offline training: the local backend with a very small random-init model, one epoch.
FAST_LOCAL_TRAINING = {
    "train": {"backend": "local", "epochs": 1},
    "local": {
        "seq_length": 128,
        "sample_max_new_tokens": 8,
        "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1},
    },
}


def tagged_deployments(prefect: Prefect) -> dict[str, dict[str, Any]]:
    """``{"flow/deployment": deployment}`` for every deployment tagged epochwise."""
    flows = {f["id"]: f["name"] for f in prefect.post("/flows/filter", {})}
    found = prefect.post("/deployments/filter", {"deployments": {"tags": {"all_": ["epochwise"]}}})
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in found}


def deployment_run(prefect: Prefect, name: str, *params: str) -> str:
    """``prefect deployment run <name> [--param k=v ...]``; returns the new flow run's id."""
    args = [item for param in params for item in ("--param", param)]
    out = prefect.run("prefect", "deployment", "run", name, *args).stdout
    match = UUID.search(out)
    assert match, out
    return match.group(1)


@pytest.fixture(scope="module")
def site(prefect_server: Prefect, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folds root with the example fold ``games`` and a config for fast local training."""
    root = tmp_path_factory.mktemp("site")
    folds = root / "folds"
    config = root / "epochwise.yaml"
    settings = yaml.safe_load((REPO / "epochwise.yaml").read_text()) | FAST_LOCAL_TRAINING
    settings["local"]["cache_dir"] = str(root / "models")
    config.write_text(yaml.safe_dump(settings))
    prefect_server.run(
        "epochwise", "prepare", str(RECORDS), "--fold", str(folds / "games"), "--config", str(config), cwd=root
    )
    return {"root": root, "folds": folds, "config": config}


@pytest.fixture(scope="module")
def applied(prefect_server: Prefect, site: dict[str, Path]) -> dict[str, Any]:
    """Apply twice, the second time with another cron and time zone and with the fold ``old`` deleted from
    disk in between (``--prune``); snapshot after each."""
    old = site["folds"] / "old"
    shutil.copytree(site["folds"] / "games", old)
    apply = ["epochwise", "deployments", "apply", "--folds-root", str(site["folds"]), "--config", str(site["config"])]
    prefect_server.run(*apply, cwd=site["root"])
    first = tagged_deployments(prefect_server)
    shutil.rmtree(old)
    out = prefect_server.run(
        *apply, "--cron", "15 3 * * *", "--timezone", "Europe/Berlin", "--prune", cwd=site["root"]
    )
    listed = prefect_server.run("epochwise", "deployments", "ls", cwd=site["root"])
    return {"first": first, "second": tagged_deployments(prefect_server), "output": out.stdout, "ls": listed.stdout}


@pytest.fixture(scope="module")
def worker(prefect_server: Prefect, applied: dict[str, Any], site: dict[str, Path]) -> Iterator[Worker]:
    """``prefect worker start --pool epochwise``, stopped before the server (fixture order)."""
    started = start_worker(prefect_server, "epochwise", site["root"] / "worker.log")
    try:
        yield started
    finally:
        stop(started.process)


@pytest.fixture(scope="module")
def games_run(prefect_server: Prefect, worker: Worker) -> dict[str, Any]:
    """Exactly ``prefect deployment run epoch-train/games``, waited for until it finishes."""
    out = prefect_server.run("prefect", "deployment", "run", "epoch-train/games").stdout
    match = UUID.search(out)
    assert match, out
    return prefect_server.wait_for_run(match.group(1), worker.log)


def test_apply_registers_each_deployment_once_and_updates_in_place(prefect_server: Prefect, applied):
    first, second = applied["first"], applied["second"]
    expected = {"epoch-train/games", "epoch-train/any-fold", "nightly-folds/nightly", "prepare-fold/any"}
    assert expected <= set(second)
    for gone in ("epoch-train/old", "sweep/old"):  # pruned: its fold is gone
        assert gone in first and gone not in second
        del first[gone]
    assert {name: d["id"] for name, d in first.items()} == {name: d["id"] for name, d in second.items()}
    assert len(prefect_server.post("/deployments/filter", {})) == len(second)
    for name in expected:
        assert name in applied["ls"]

    games = second["epoch-train/games"]
    assert games["parameters"]["fold"] == str(Path(games["parameters"]["fold"]).resolve())
    assert Path(games["parameters"]["fold"]).name == "games"
    assert games["parameters"]["train"] == {"backend": "local", "epochs": 1}
    assert games["work_pool_name"] == "epochwise"
    assert games["entrypoint"] == "flows.epoch_train.epoch_train"
    assert games["job_variables"]["env"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(prefect_server.home / "storage")
    assert games["global_concurrency_limit"]["limit"] == 1
    [schedule] = games["schedules"]
    assert schedule["schedule"] == {"cron": "15 3 * * *", "timezone": "Europe/Berlin", "day_or": True}
    assert schedule["active"] is True
    [nightly] = second["nightly-folds/nightly"]["schedules"]
    assert nightly["active"] is False  # per-fold schedules are the active ones by default
    assert second["epoch-train/any-fold"]["schedules"] == []

    pool = prefect_server.get("/work_pools/epochwise")
    assert pool["type"] == "process"
    limits = {gcl["name"]: gcl for gcl in prefect_server.post("/v2/concurrency_limits/filter", {})}
    assert limits["tag:together-api"]["limit"] == 4 and limits["tag:together-api"]["active"]
    assert limits["nightly-folds"]["limit"] == 2 and limits["nightly-folds"]["active"]
    automations = [a for a in prefect_server.post("/automations/filter", {}) if a["name"] == CRASH_AUTOMATION]
    assert len(automations) == 1 and automations[0]["enabled"]
    trigger = automations[0]["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["after"] == ["prefect.flow-run.heartbeat"]
    assert automations[0]["actions"][0]["state"] == "CRASHED"


def test_deployment_run_epoch_train_games_completes_with_epochs_table(prefect_server: Prefect, games_run):
    assert games_run["state"]["type"] == "COMPLETED", games_run["state"]
    [latest, *_] = prefect_server.artifacts("games-epochs")
    assert latest["flow_run_id"] == games_run["id"]
    assert latest["type"] == "table"
    rows = json.loads(latest["data"])
    assert [row["epoch"] for row in rows] == [1]
    assert rows[0]["status"] == "completed"
    assert float(rows[0]["val loss"]) > 0
    task_runs = prefect_server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [games_run["id"]]}}})
    assert task_runs and all(t["state"]["type"] == "COMPLETED" for t in task_runs)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with everything that would reach the network or a GPU switched off."""
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
         "--virtual-time-budget=20000", "--window-size=1400,1000", *args],
        capture_output=True, text=True, timeout=180,
    )


def visible_text(dom: str) -> str:
    """Text a user sees: scripts, styles and tags removed, whitespace collapsed."""
    dom = re.sub(r"<(script|style|template)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_ui_shows_the_completed_run(prefect_server: Prefect, games_run, tmp_path: Path):
    page = f"{prefect_server.url}/runs/flow-run/{games_run['id']}"
    dom = chromium("--dump-dom", page, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = visible_text(dom.stdout)
    assert games_run["name"] in text, text[:2000]
    assert "Completed" in text, text[:2000]
    assert "epoch-train" in text and "games" in text, text[:2000]
    assert "connect to Server API" not in text, text[:2000]  # PREFECT_UI_API_URL names this port

    png = tmp_path / "flow-run.png"
    shot = chromium(f"--screenshot={png}", page, profile=tmp_path / "profile-shot")
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 1000)
    print(f"screenshot of {page}: {png}")


def test_a_fold_never_runs_twice_at_once(prefect_server: Prefect, games_run, worker: Worker):
    # Two runs created a few milliseconds apart (through the API: two CLI calls are seconds apart, and a
    # cached no-op run may finish within that gap).
    deployment = prefect_server.get("/deployments/name/epoch-train/games")
    first, second = (prefect_server.post(f"/deployments/{deployment['id']}/create_flow_run", {})["id"]
                     for _ in range(2))
    runs = sorted((prefect_server.wait_for_run(i, worker.log) for i in (first, second)), key=lambda r: r["start_time"])
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    assert runs[1]["start_time"] >= runs[0]["end_time"], runs
    waited = {s["name"] for r in runs for s in prefect_server.get(f"/flow_run_states/?flow_run_id={r['id']}")}
    assert "AwaitingConcurrencySlot" in waited, waited


def test_nightly_folds_trains_every_fold(prefect_server: Prefect, games_run, worker: Worker, site):
    # A fold added after the last apply (no epoch-train/chess deployment): nightly-folds finds it at run
    # time and trains it through epoch-train/any-fold. One records file keeps it small.
    chess = site["folds"] / "chess"
    prepared = deployment_run(prefect_server, "prepare-fold/any", f"records={RECORDS / 'nim.jsonl'}", f"fold={chess}")
    assert prefect_server.wait_for_run(prepared, worker.log)["state"]["type"] == "COMPLETED"

    nightly = prefect_server.wait_for_run(deployment_run(prefect_server, "nightly-folds/nightly"), worker.log)
    assert nightly["state"]["type"] == "COMPLETED", (nightly["state"], tail(worker.log))
    [summary, *_] = prefect_server.artifacts(f"{site['folds'].name}-nightly")
    assert summary["flow_run_id"] == nightly["id"]
    rows = {row["fold"]: row for row in json.loads(summary["data"])}
    assert set(rows) == {"chess", "games"}
    assert rows["games"]["deployment"] == "epoch-train/games"
    assert rows["chess"]["deployment"] == "epoch-train/any-fold"
    for fold, row in rows.items():
        child = prefect_server.get(f"/flow_runs/{row['flow run id']}")
        assert child["state"]["type"] == "COMPLETED"
        assert Path(child["parameters"]["fold"]).name == fold
        assert child["parent_task_run_id"] is not None  # shown under the nightly run in the UI
    [chess_epochs, *_] = prefect_server.artifacts("chess-epochs")
    assert chess_epochs["flow_run_id"] == rows["chess"]["flow run id"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_ui_draws_the_report_loss_curve(prefect_server: Prefect, games_run, site, tmp_path: Path):
    from tests.e2e.browser import images

    [report, *_] = prefect_server.artifacts("games-report")
    assert report["type"] == "markdown" and "](data:image/png;base64," in report["data"]
    assert (site["folds"] / "games" / "report" / "report.md").is_file()
    assert (site["folds"] / "games" / "report" / "loss.png").is_file()
    # Both Prefect UIs: the default (Vue) one, and the React one under /v2, whose markdown renderer
    # sanitizes URLs but lets data:image/ through for <img src>.
    for ui in ("", "/v2"):
        page = f"{prefect_server.url}{ui}/artifacts/artifact/{report['id']}"
        profile = tmp_path / f"profile-report{ui.replace('/', '-')}"
        drawn = images(page, "data:image/png", profile)
        assert drawn and all(i["complete"] and i["naturalWidth"] > 0 and i["naturalHeight"] > 0 for i in drawn), (
            page, drawn)

        png = tmp_path / f"report{ui.replace('/', '-')}.png"
        shot = chromium(f"--screenshot={png}", page, profile=tmp_path / f"{profile.name}-shot")
        assert shot.returncode == 0, shot.stderr[-2000:]
        print(f"screenshot of {page}: {png} (images drawn: {drawn})")
