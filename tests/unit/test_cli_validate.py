"""``epochwise validate``: the project's rules by default, together's check_file on request, and the
settings it reads (data.max_line_bytes) honoured from every source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.cli.common import defaults_apply

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
LOADED = (
    "import sys; sys.argv = ['epochwise', *sys.argv[1:]]\n"
    "from epochwise.cli import main\n"
    "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
    "heavy = ('prefect', 'together', 'torch', 'pyarrow', 'httpx', 'pydantic_settings', 'yaml')\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))"
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory without epochwise.yaml, no EPOCHWISE_* variables, its own user cache (where passed
    settings loads are recorded), and one valid train.jsonl."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in [k for k in os.environ if k.upper().startswith("EPOCHWISE_")]:
        monkeypatch.delenv(name)
    (tmp_path / "train.jsonl").write_text(GOOD + "\n", encoding="utf-8")
    return tmp_path


def heavy_imports(workdir: Path, *args: str) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EPOCHWISE_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *args], cwd=workdir, env=env, capture_output=True, text=True, check=True
    )
    *output, modules = done.stdout.strip().splitlines()
    return json.loads(modules.replace("'", '"')), "\n".join(output)


def test_validate_checks_without_the_together_sdk_or_settings_loader(workdir: Path) -> None:
    modules, output = heavy_imports(workdir, "validate", "train.jsonl")
    assert output == "train.jsonl: ok"
    assert modules == []


def test_validate_in_a_project_reads_its_config_without_pydantic_settings(workdir: Path) -> None:
    """pydantic-settings parses EPOCHWISE_* variables; with none set, the config file needs only YAML."""
    (workdir / "epochwise.yaml").write_text("data:\n  max_line_bytes: 100000\n", encoding="utf-8")
    modules, output = heavy_imports(workdir, "validate", "train.jsonl")
    assert output == "train.jsonl: ok"
    assert modules == ["yaml"]


def recorded(workdir: Path) -> list[Path]:
    return sorted((workdir / "cache" / "epochwise" / "settings").glob("*.json"))


def test_a_second_validate_in_a_project_answers_from_the_record_of_the_first(workdir: Path) -> None:
    """A passed load records the two values validate needs; the next run of the same inputs reads them
    back without YAML, and an edit to the config file is another set of inputs, loaded in full."""
    config = workdir / "epochwise.yaml"
    config.write_text("data:\n  max_line_bytes: 100000\n", encoding="utf-8")
    assert heavy_imports(workdir, "validate", "train.jsonl") == (["yaml"], "train.jsonl: ok")
    [record] = recorded(workdir)
    assert json.loads(record.read_text()) == {"data.max_line_bytes": 100000, "train.method": "sft"}
    assert heavy_imports(workdir, "validate", "train.jsonl") == ([], "train.jsonl: ok")
    config.write_text("data:\n  max_line_bytes: 30\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", "train.jsonl"])
    assert result.exit_code == 1
    assert f"train.jsonl:1: line is {len(GOOD) + 1} bytes, over the limit of 30" in result.output
    assert len(recorded(workdir)) == 2


def test_a_bad_config_is_reported_with_its_line_every_time_and_never_recorded(workdir: Path) -> None:
    (workdir / "epochwise.yaml").write_text("data:\n  seed: 1\n  max_line_bytes: -5\n", encoding="utf-8")
    for _ in range(2):
        result = CliRunner().invoke(app, ["validate", "train.jsonl"])
        assert result.exit_code == 1
        assert result.output.startswith("epochwise.yaml:3: data.max_line_bytes")
    assert recorded(workdir) == []


def test_together_check_runs_togethers_check_file(workdir: Path) -> None:
    modules, output = heavy_imports(workdir, "validate", "--together-check", "train.jsonl")
    assert output == "train.jsonl: ok"
    assert "together" in modules


def test_a_bad_file_fails_with_and_without_the_together_check(workdir: Path) -> None:
    (workdir / "bad.jsonl").write_text(GOOD + "\n[1]\n", encoding="utf-8")
    for extra in ([], ["--together-check"]):
        result = CliRunner().invoke(app, ["validate", *extra, "bad.jsonl"])
        assert result.exit_code == 1
        assert result.output.splitlines() == ["bad.jsonl:2: expected a JSON object, got an array", "1 problem(s) found"]


def test_max_line_bytes_from_the_environment_or_config_file_still_applies(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = len(GOOD)
    result = CliRunner().invoke(app, ["validate", "train.jsonl"], env={"EPOCHWISE_DATA__MAX_LINE_BYTES": "20"})
    assert result.exit_code == 1
    assert f"train.jsonl:1: line is {size + 1} bytes, over the limit of 20" in result.output
    (workdir / "epochwise.yaml").write_text("data:\n  max_line_bytes: 30\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", "train.jsonl"])
    assert result.exit_code == 1
    assert f"train.jsonl:1: line is {size + 1} bytes, over the limit of 30" in result.output


def test_defaults_apply_only_when_nothing_can_set_a_setting(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert defaults_apply(None, [])
    assert not defaults_apply(None, ["quick_test"])
    assert not defaults_apply(workdir / "train.jsonl", None)
    monkeypatch.setenv("epochwise_data__seed", "3")
    assert not defaults_apply(None, None)
    monkeypatch.delenv("epochwise_data__seed")
    (workdir / "epochwise.yaml").write_text("data: {}\n", encoding="utf-8")
    assert not defaults_apply(None, None)
