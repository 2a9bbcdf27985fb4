"""Benchmark: how fast the ``epochwise`` CLI starts, against a bare ``import typer, rich``.

    python bench/cli_start.py [--runs 7] [--root PATH] [--large-mb 100] [--repeat 2] [--no-large | --no-cli]

Each round runs, one after the other in fresh interpreters, the baseline ``python -c "import typer,
rich"``, ``epochwise --help`` and ``epochwise validate`` of a 24-line fold file (with and without
``--together-check``, and once more with an empty user cache, before validate has recorded the
project's settings); the figures are medians over the rounds, so a busy machine slows both sides
alike. Targets: ``--help`` <= 2x the baseline, ``validate`` <= 3x. Reference rows: typer's rich help
renderer (``typer.rich_utils``, which loads rich's markdown, traceback and syntax modules; the CLI's
help is click's plain text since it cost more than the rest of ``--help``), and the floor of any
command that runs, pydantic (typer 0.29 converts every parameter through a pydantic ``TypeAdapter``).
A third, the floor of a first run: that plus the imports a full settings load needs before any of
its own code runs (PyYAML, pydantic's ``BaseModel`` and ``Field``).
``--pyc-cache`` gives every command a bytecode cache, as an installed package has, where the
environment sets PYTHONDONTWRITEBYTECODE (else each run compiles the checkout's sources again). ``--root`` (repeatable, rounds alternate between roots)
measures another checkout of the code (e.g. a worktree of an older commit) with this same interpreter;
a command that fails there (an option it lacks) shows n/a. Then ``python -X importtime`` lists which
heavy packages (prefect, together, torch, pyarrow, ...) each command imports at all.

Last, in this process: ``validate_file`` of a generated ~100 MB ChatML JSONL against a bare
``orjson.loads`` loop over the same file (target <= 1.2x), with and without together's ``check_file``;
wall and CPU seconds, best of ``--repeat``. A bare ``msgspec`` decode loop (the decoder the bulk path
uses, untyped, a call per line) is shown for information; the target is against orjson.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("prefect", "together", "torch", "pyarrow", "transformers", "wandb", "openai_harmony", "httpx", "sqlalchemy", "pydantic_settings", "yaml")
BASELINE = "baseline (import typer, rich)"
CLI = "import sys; sys.argv[0] = 'epochwise'; from epochwise.cli import main; main()"
WORDS = "alice bob stones pile table turn takes wins rock paper scissors board move first last player".split()


def conversation(rng: random.Random, words: int) -> str:
    story = " ".join(rng.choice(WORDS) for _ in range(words))
    return json.dumps(
        {
            "messages": [
                {"role": "system", "content": "You answer with the game's context as compact JSON."},
                {"role": "user", "content": f"Generate a detailed socialized context for:\n\n{story}"},
                {"role": "assistant", "content": json.dumps({"game": "nim", "stones": rng.randint(5, 30)})},
            ]
        }
    )


def write_jsonl(path: Path, target_bytes: int, words: int = 110, seed: int = 0) -> int:
    """ChatML rows until the file has ``target_bytes``; returns the row count."""
    rng = random.Random(seed)
    rows = size = 0
    with open(path, "w", encoding="utf-8") as out:
        while size < target_bytes:
            line = conversation(rng, words) + "\n"
            out.write(line)
            size += len(line.encode())
            rows += 1
    return rows


# Set by --pyc-cache: where the commands keep their bytecode (PYTHONPYCACHEPREFIX), None to run as the
# environment says (with PYTHONDONTWRITEBYTECODE set, every run compiles the checkout's sources again).
PYC_CACHE: Path | None = None
# The commands' user cache (XDG_CACHE_HOME), where validate records a passed settings load; set in main.
USER_CACHE: Path | None = None
# The row whose every run starts with an empty user cache: validate in a project before any record.
FIRST_LOAD = "  first run (no settings record)"


def child_env(root: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1", **extra}
    if USER_CACHE is not None and "XDG_CACHE_HOME" not in extra:
        env["XDG_CACHE_HOME"] = str(USER_CACHE)
    if PYC_CACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYC_CACHE)
    return env


def timed(argv: list[str], root: Path, cwd: Path | None = None) -> tuple[float, float] | None:
    """Wall-clock and CPU (user + system) seconds of one run (None when it fails); CPU time is far
    less sensitive to load."""
    fresh = {"XDG_CACHE_HOME": tempfile.mkdtemp(dir=USER_CACHE.parent)} if argv[-1:] == [FIRST_LOAD] else {}
    env = child_env(root, COLUMNS="120", **fresh)
    argv = argv[:-1] if fresh else argv
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd or root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        print(f"{root}: {' '.join(argv[3:])} failed ({done.returncode}): {(done.stdout + done.stderr)[-300:]}")
        return None
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imported_heavy(argv: list[str], root: Path, cwd: Path | None = None) -> list[str]:
    """Top-level packages among HEAVY that ``argv`` imports (from ``-X importtime``'s report)."""
    fresh = {"XDG_CACHE_HOME": tempfile.mkdtemp(dir=USER_CACHE.parent)} if argv[-1:] == [FIRST_LOAD] else {}
    env = child_env(root, **fresh)
    argv = argv[:-1] if fresh else argv
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=cwd or root, env=env, capture_output=True, text=True)
    found = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip().split(".")[0]
            if name in HEAVY:
                found.add(name)
    return sorted(found)


def cli_start(roots: list[Path], runs: int, small: Path) -> None:
    """Median start times per root; rounds alternate between the roots so load hits them alike."""
    commands = {
        BASELINE: [sys.executable, "-c", "import typer, rich"],
        # What typer's rich help renderer would add (the CLI's help no longer uses it).
        "ref: + typer.rich_utils": [sys.executable, "-c", "import typer.rich_utils, rich"],
        "epochwise --help": [sys.executable, "-c", CLI, "--help"],
        # What running any command needs: typer converts each parameter with a pydantic TypeAdapter.
        "floor: + pydantic TypeAdapter": [
            sys.executable,
            "-c",
            "import typer, rich; from pathlib import Path; from pydantic import TypeAdapter; TypeAdapter(list[Path])",
        ],
        # What a full settings load imports on top of that floor before any epochwise code runs: PyYAML
        # and pydantic's model machinery (BaseModel, Field: pydantic.types, annotated_types). The first
        # run below cannot start faster than this.
        "floor: + BaseModel, PyYAML": [
            sys.executable,
            "-c",
            "import typer, rich, hashlib; from pathlib import Path; from pydantic import TypeAdapter; "
            "TypeAdapter(list[Path]); import yaml; from pydantic import BaseModel, Field",
        ],
        # In the checkout, whose ./epochwise.yaml is loaded and checked once (YAML, Settings); later
        # runs of the same inputs read the two values validate needs from the record of that load.
        "epochwise validate (24 lines)": [sys.executable, "-c", CLI, "validate", str(small)],
        # The same, each run with an empty user cache (the marker is dropped before running).
        FIRST_LOAD: [sys.executable, "-c", CLI, "validate", str(small), FIRST_LOAD],
        # Beside the file, with no config file: data.max_line_bytes's default, no settings loader.
        "  in a directory without config": [sys.executable, "-c", CLI, "validate", small.name],
        "  --together-check (whole SDK)": [sys.executable, "-c", CLI, "validate", "--together-check", str(small)],
    }
    times = {(root, name): [] for root in roots for name in commands}
    cwd = {name: small.parent if name == "  in a directory without config" else None for name in commands}
    works = {(root, name) for root in roots for name, argv in commands.items() if timed(argv, root, cwd[name])}
    for _ in range(runs):
        for root in roots:
            for name, argv in commands.items():
                if (root, name) in works:
                    times[root, name].append(timed(argv, root, cwd[name]) or (float("nan"), float("nan")))
    for root in roots:
        print(f"\nCLI start, {root}, median of {runs} rounds")
        print(f"{'command':32} {'wall s':>7} {'x base':>7} {'cpu s':>6} {'x base':>7}  heavy imports")
        base_wall = statistics.median(t[0] for t in times[root, BASELINE])
        base_cpu = statistics.median(t[1] for t in times[root, BASELINE])
        for name, argv in commands.items():
            if (root, name) not in works:
                print(f"{name:32} {'n/a':>7}")
                continue
            wall = statistics.median(t[0] for t in times[root, name])
            cpu = statistics.median(t[1] for t in times[root, name])
            heavy = ", ".join(imported_heavy(argv, root, cwd[name])) or "-"
            print(f"{name:32} {wall:7.3f} {wall / base_wall:7.2f} {cpu:6.3f} {cpu / base_cpu:7.2f}  {heavy}")


def large_validate(megabytes: int, repeat: int) -> None:
    import msgspec
    import orjson

    from epochwise.validate import validate_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.jsonl"
        rows = write_jsonl(path, megabytes * 1024 * 1024)
        size = path.stat().st_size

        def parse_loop() -> None:
            with open(path, "rb") as handle:
                for line in handle:
                    orjson.loads(line)

        def best(fn) -> tuple[float, float]:
            """Best wall and best CPU seconds of ``repeat`` runs."""
            walls, cpus = [], []
            for _ in range(repeat):
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
            return min(walls), min(cpus)

        def msgspec_loop() -> None:
            decode = msgspec.json.Decoder().decode
            with open(path, "rb") as handle:
                for line in handle:
                    decode(line)

        floor = best(parse_loop)
        other = best(msgspec_loop)
        ours = best(lambda: validate_file(path, run_together_check=False))
        full = best(lambda: validate_file(path))
        problems = validate_file(path)
        assert not problems, problems[:3]
        print(f"\nvalidate of {size / 1e6:.0f} MB, {rows:,} rows (best of {repeat})")
        print(f"{'':34} {'wall s':>7} {'MB/s':>7} {'x parse':>8} {'cpu s':>7} {'x parse':>8}")
        for label, (wall, cpu) in (
            ("bare orjson.loads loop", floor),
            ("(info) bare msgspec decode loop", other),
            ("validate_file, epochwise rules", ours),
            ("validate_file + together check", full),
        ):
            print(
                f"{label:34} {wall:7.2f} {size / 1e6 / wall:7.0f} {wall / floor[0]:8.2f} {cpu:7.2f} {cpu / floor[1]:8.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--root", type=Path, action="append", help="Checkout to measure (repeatable; default: this one)."
    )
    parser.add_argument("--large-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-large", action="store_true")
    parser.add_argument(
        "--pyc-cache",
        action="store_true",
        help="Give every command (the baseline too) a bytecode cache in a temporary directory, as an installed "
        "package has, even where PYTHONDONTWRITEBYTECODE is set (the first, untimed run of each fills it).",
    )
    parser.add_argument("--no-cli", action="store_true", help="Only the large-file validation.")
    args = parser.parse_args()
    if args.no_large and args.no_cli:
        parser.error("--no-large and --no-cli leave nothing to measure")
    global PYC_CACHE, USER_CACHE
    if not args.no_cli:
        with tempfile.TemporaryDirectory() as tmp:
            USER_CACHE = Path(tmp) / "user-cache"
            if args.pyc_cache:
                PYC_CACHE = Path(tmp) / "pyc"
            mode = f"bytecode cached in {PYC_CACHE}" if PYC_CACHE else "bytecode as the environment says"
            print(f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}; {mode}")
            small = Path(tmp) / "train.jsonl"
            rng = random.Random(1)
            small.write_text("".join(conversation(rng, 40) + "\n" for _ in range(24)), encoding="utf-8")
            roots = [r.resolve() for r in args.root or [Path(__file__).resolve().parents[1]]]
            cli_start(roots, args.runs, small)
    if not args.no_large:
        large_validate(args.large_mb, args.repeat)


if __name__ == "__main__":
    main()
