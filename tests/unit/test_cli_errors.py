"""User errors through the real CLI: the exact reason, the source that set a bad value, exit code 1,
no traceback, and no work done before the check (no validation, conversion, download or Prefect)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epochwise.cli import app

EPOCHWISE = str(Path(sys.executable).parent / "epochwise")
ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.fixture
def fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid fold, in a working directory without an epochwise.yaml."""
    monkeypatch.chdir(tmp_path)
    fold = tmp_path / "games"
    fold.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (fold / name).write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    return fold


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.output
    return result.exit_code, lines(result.output)


# --- a bad setting names whatever set it --------------------------------------------------------


def test_a_flag_is_blamed_by_its_name(fold: Path) -> None:
    assert run("train", str(fold), "--epochs", "0") == (
        1,
        ["--epochs: input should be greater than or equal to 1 (got 0)"],
    )
    assert run("train", str(fold), "--backend", "lokal") == (
        1,
        ["--backend: input should be 'auto', 'together' or 'local' (got 'lokal')"],
    )
    # Flags whose parameter or settings field is named differently from the flag.
    assert run("train", str(fold), "--lr", "-1") == (1, ["--lr: input should be greater than 0 (got -1.0)"])
    assert run("train", str(fold), "--budget", "0") == (1, ["--budget: input should be greater than 0 (got 0.0)"])
    assert run("deploy", str(fold), "--inactive-timeout", "5") == (
        1,
        ["--inactive-timeout: inactive_timeout_min is 0 (disabled) or 30-1440 minutes (Together's range) (got 5)"],
    )


def test_an_environment_variable_is_blamed_by_its_name(fold: Path) -> None:
    assert run("train", str(fold), env={"EPOCHWISE_TRAIN__EPOCHS": "0"}) == (
        1,
        ["EPOCHWISE_TRAIN__EPOCHS=0: input should be greater than or equal to 1"],
    )


def test_a_yaml_value_is_blamed_by_file_and_line(fold: Path) -> None:
    (fold.parent / "epochwise.yaml").write_text("# project\ntrain:\n  backend: local\n  epochs: 0\n")
    assert run("train", str(fold)) == (
        1,
        ["epochwise.yaml:4: train.epochs: input should be greater than or equal to 1"],
    )
    other = fold.parent / "other.yaml"
    other.write_text("data:\n  val_ratio: 2\n")
    code, out = run("prepare", str(fold), "--fold", str(fold.parent / "f"), "--config", str(other))
    assert (code, out) == (1, [f"{other}:2: data.val_ratio: input should be less than 1"])


def test_a_flag_wins_over_the_file_and_is_the_one_blamed(fold: Path) -> None:
    (fold.parent / "epochwise.yaml").write_text("train:\n  epochs: 0\n")
    assert run("train", str(fold), "--epochs", "-2") == (
        1,
        ["--epochs: input should be greater than or equal to 1 (got -2)"],
    )


def test_broken_yaml_names_the_line(fold: Path) -> None:
    (fold.parent / "epochwise.yaml").write_text("train:\n  epochs: [1\n")
    code, out = run("train", str(fold))
    assert code == 1 and len(out) == 1 and out[0].startswith("epochwise.yaml:3: invalid YAML: ")


# --- status of a fold that does not exist -------------------------------------------------------


def test_status_of_a_missing_fold_fails_at_once(fold: Path) -> None:
    assert run("status", "nosuchdir") == (
        1,
        ["nosuchdir: fold folder does not exist (make one with `epochwise prepare RECORDS --fold nosuchdir`)"],
    )
    assert run("deploy-info", "nosuchdir")[0] == 1
    assert run("status", str(fold / "train.jsonl"))[1][0].endswith(
        f"fold folder is not a directory (make one with `epochwise prepare RECORDS --fold {fold / 'train.jsonl'}`)"
    )


# --- Together without a key: fails before any validation or conversion ----------------------------


def test_together_without_a_key_fails_before_any_work(fold: Path) -> None:
    (fold / "train.jsonl").write_text('{"messages": []}\n', encoding="utf-8")  # validation would report it
    code, out = run("train", str(fold), "--backend", "together", "--base-model", "openai/gpt-oss-20b")
    assert (code, out) == (
        1,
        [
            "error: no Together API key: export TOGETHER_API_KEY or save a TogetherCredentials block "
            "and set together.credentials_block"
        ],
    )
    assert sorted(p.name for p in fold.iterdir()) == ["train.jsonl", "val.jsonl"]  # no harmony/, no local/


# --- a mistyped --model: fails fast with the closest built-in, no download ---------------------


class Hub(http.server.BaseHTTPRequestHandler):
    """The Hugging Face hub's answer for a repository that does not exist; records every request."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[tuple[str, list[str]]]:
    Hub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Hub.requests
    server.shutdown()


def cli(fold: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed ``epochwise`` script in a fresh process (the hub settings are read at import)."""
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    home = fold.parent / "hf-home"
    return subprocess.run(
        [EPOCHWISE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=fold.parent,
        env={**base, "HF_HOME": str(home), **env},
    )


def test_mistyped_model_offline_names_the_built_in_and_downloads_nothing(fold: Path, hub) -> None:
    url, requests = hub
    done = cli(fold, "train", str(fold), "--backend", "local", "--model", "smolm2", HF_HUB_OFFLINE="1", HF_ENDPOINT=url)
    assert done.returncode == 1, done.stderr
    assert lines(done.stdout + done.stderr) == [
        "error: --model smolm2: not a built-in (tiny, smollm2), a model directory or a cached hub model, "
        "and the hub is off (HF_HUB_OFFLINE); did you mean 'smollm2'?"
    ]
    assert requests == []
    assert not (fold.parent / "hf-home").exists() and not (fold / "local").exists()


def test_mistyped_model_online_asks_the_hub_once_and_downloads_nothing(fold: Path, hub) -> None:
    url, requests = hub
    done = cli(fold, "train", str(fold), "--backend", "local", "--model", "smolm2", HF_ENDPOINT=url)
    assert done.returncode == 1, done.stderr
    assert lines(done.stdout + done.stderr) == [
        "error: --model smolm2: not a built-in (tiny, smollm2), a model directory or a cached hub model, "
        "and the hub has no such model (a private one needs HF_TOKEN); did you mean 'smollm2'?"
    ]
    # One metadata request for the model (huggingface_hub also fetches its agent registry), no download.
    assert [p.split("?")[0] for p in requests if p.startswith("/api/models/")] == ["/api/models/smolm2"]
    assert not [p for p in requests if "/resolve/" in p]


def test_unreachable_hub_fails_at_once(fold: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    done = cli(
        fold, "train", str(fold), "--model", "Qwen/Qwen2.5-0.5B-Instruct", HF_ENDPOINT=f"http://127.0.0.1:{closed}"
    )
    assert done.returncode == 1
    assert lines(done.stdout + done.stderr) == [
        "error: --model Qwen/Qwen2.5-0.5B-Instruct: not a built-in (tiny, smollm2), a model directory or a "
        f"cached hub model, and the hub (http://127.0.0.1:{closed}) cannot be reached"
    ]


def test_a_cached_hub_model_passes_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from epochwise.local.keys import check_model

    snapshot = tmp_path / "models--org--tiny-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny-model" / "refs").mkdir()
    (tmp_path / "models--org--tiny-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_model("org/tiny-model")  # cached: accepted without the hub
    check_model("tiny")
    with pytest.raises(FileNotFoundError, match="did you mean 'tiny'"):
        check_model("tinny")
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE\)$"):
        check_model("org/other-model")  # nothing close to a built-in: no suggestion


def test_a_temporary_prefect_api_that_does_not_start_is_one_line_not_a_traceback(fold: Path, tmp_path: Path) -> None:
    # A zero start-up allowance makes Prefect give up on its ephemeral server before it answers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    done = subprocess.run(
        [EPOCHWISE, "train", str(fold), "--backend", "local", "--epochs", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert lines(done.stderr)[-1].startswith("error: Prefect's temporary API server did not start within 0 s")
    assert "PREFECT_API_URL" in done.stderr
    assert not (fold / "local").exists()  # nothing trained


def test_the_cli_sets_prefects_start_up_allowance_before_prefect_reads_its_settings(tmp_path: Path) -> None:
    # Prefect reads its settings once, at import: a default set later would be silently ignored.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    script = (
        "import sys; from epochwise.cli import main; sys.argv = ['epochwise', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "from prefect.settings import get_current_settings\n"
        "print('TIMEOUT', get_current_settings().server.ephemeral.startup_timeout_seconds)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "TIMEOUT 90" in done.stdout, done.stderr
