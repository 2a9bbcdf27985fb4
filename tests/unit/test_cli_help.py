"""Every CLI option that sets a config field shows that field's real default and path in its help,
built from the config models (one source), never restated by hand."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import typer.main
from pydantic import BaseModel

from epochwise.cli import app, common
from epochwise.cli.common import FLAG_PARAMETERS
from epochwise.config import Settings

TAG = re.compile(r"\((?:default: (?P<default>.*); )?(?P<path>[a-z_]+(?:\.[a-z_]+)+)\)$")
# Options named like a config field that set something else (convert's output format is not data.mapping.format).
# Options named like a config field that are not one: `sample` generates for one prompt, not a setting.
NOT_CONFIG = {("convert", "format"), ("sample", "max_new_tokens")}


def commands() -> list[tuple[str, Any]]:
    found, todo = [], [("", typer.main.get_command(app))]
    while todo:
        name, command = todo.pop()
        found.append((name, command))
        todo.extend(getattr(command, "commands", {}).items())
    return found


def options() -> list[tuple[str, Any]]:
    """(command name, option) for every option of every command (typer ships its own click)."""
    return [(name, p) for name, command in commands() for p in command.params if p.param_type_name == "option"]


def real_default(dotted: str) -> Any:
    """The default of ``dotted`` read off default-constructed config models (not the help helper)."""
    section, *rest = dotted.split(".")
    value: Any = getattr(Settings(), section)
    for part in rest:
        value = getattr(value, part)
    return value


def real_description(dotted: str) -> str:
    section, *rest = dotted.split(".")
    model: Any = getattr(Settings(), section)
    for part in rest[:-1]:
        model = getattr(model, part)
    return type(model).model_fields[rest[-1]].description or ""


def field_leaves(model: BaseModel | None = None) -> set[str]:
    """Every field of a default-constructed `Settings` that is not itself a section (by its last name)."""
    model = Settings() if model is None else model
    leaves = set()
    for name in type(model).model_fields:
        inner = getattr(model, name)
        leaves |= field_leaves(inner) if isinstance(inner, BaseModel) else {name}
    return leaves


def tagged() -> list[tuple[str, Any, str, str | None]]:
    rows = []
    for command, option in options():
        match = TAG.search(" ".join((option.help or "").split()))
        if match:
            rows.append((command, option, match["path"], match["default"]))
    return rows


def test_there_are_config_options_in_every_command_family():
    paths = {path.split(".")[0] for _, _, path, _ in tagged()}
    assert {"train", "data", "harmony", "deploy", "ops"} <= paths
    assert len([1 for command, *_ in tagged() if command == "train"]) >= 24


@pytest.mark.parametrize("row", tagged(), ids=lambda row: f"{row[0]}--{row[1].name}")
def test_option_help_shows_the_fields_real_default(row):
    _, option, path, shown = row
    value = real_default(path)
    if value is None:
        assert shown is None, f"{path} has no default, help says {shown!r}"
    elif isinstance(value, bool):
        assert shown == str(value).lower()
    elif isinstance(value, float):
        assert shown is not None and float(shown) == value
    else:
        assert shown == str(value)
    assert (option.help or "").count("default") <= 1 or "default" in real_description(path)  # none by hand


def test_every_option_named_like_a_config_field_is_built_from_it():
    leaves = field_leaves()
    built = {(command, option.name) for command, option, _, _ in tagged()}
    missing = [
        (command, option.name)
        for command, option in options()
        if (option.name in leaves or option.name in FLAG_PARAMETERS.values())
        and (command, option.name) not in NOT_CONFIG | built
    ]
    assert not missing


def test_known_defaults_appear_verbatim():
    helps = {(command, option.name): " ".join((option.help or "").split()) for command, option in options()}
    assert "(default: 0.0001; train.hyper.learning_rate)" in helps["train", "learning_rate"]
    assert "(default: 3; train.epochs)" in helps["train", "epochs"]
    assert "(default: 42; data.seed)" in helps["prepare", "seed"]
    assert "(default: 8192; harmony.max_seq_length)" in helps["convert", "max_seq_length"]


def test_sections_are_the_settings_sections():
    from epochwise.config import SECTIONS

    assert {name: field.annotation for name, field in Settings.model_fields.items()} == SECTIONS


def test_starting_the_cli_imports_no_heavy_package():
    """``epochwise --help`` and the command table load neither Prefect, together, torch, pyarrow nor pydantic
    (option help comes from the generated table): each command imports what it needs when it runs (speed in bench/)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['epochwise', '--help']\n"
        "from epochwise.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('prefect', 'together', 'torch', 'pyarrow', 'transformers', 'wandb', 'pydantic', 'blocks',\n"
        "         'markdown_it', 'pygments')  # the last two: typer's rich help renderer\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy) | {'typer.rich_utils'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_help_shows_option_help_as_written():
    """Help text is not read as rich markup: brackets in it (``list[float | None]``) are shown, not swallowed."""
    import subprocess
    import sys

    code = "import sys; sys.argv = ['epochwise', 'train', '--help']\nfrom epochwise.cli import main\nmain()"
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-500:]
    text = " ".join(done.stdout.split())
    assert "-> list[float | None]. (default: []; train.rewards)" in text, text[-2000:]
    assert "Usage: epochwise train [OPTIONS]" in text


def test_the_generated_help_table_is_current_and_used():
    """``--help`` reads option help from epochwise/cli/_help_fields.py (no pydantic import); that table must
    be what the config models give today (regenerate: ``python -m epochwise.cli.help_table``)."""
    from epochwise.cli import _help_fields, help_table
    from epochwise.cli.common import _help_fields as loaded

    assert _help_fields.DIGEST == help_table.config_digest(), "run: python -m epochwise.cli.help_table"
    assert help_table.TABLE.read_text(encoding="utf-8") == help_table.render()
    assert loaded() is _help_fields.FIELDS
    assert "train.hyper.learning_rate" in _help_fields.FIELDS


def test_field_help_reads_the_models_when_the_table_is_stale(monkeypatch):
    """A table built from other config sources is ignored: the help is read off the models, never stale."""
    from epochwise.cli import _help_fields

    stale = {path: ("stale text", "stale") for path in _help_fields.FIELDS}
    monkeypatch.setattr(_help_fields, "FIELDS", stale)
    monkeypatch.setattr(_help_fields, "DIGEST", "00000000")
    monkeypatch.setattr(common, "_HELP_FIELDS", None)
    text = common.field_help("train.hyper.learning_rate")
    assert "stale" not in text
    assert text == f"{real_description('train.hyper.learning_rate')} (default: {real_default('train.hyper.learning_rate')!r}; train.hyper.learning_rate)"
    monkeypatch.setattr(common, "_HELP_FIELDS", None)


@pytest.fixture
def own_apps(monkeypatch):
    """A test that builds its own apps puts `common.APP` back after (`build_app` sets it), so later
    tests' config errors spell flags from the whole app's commands (``--lr``), not from its last one."""
    monkeypatch.setattr(common, "APP", common.APP)


@pytest.mark.usefixtures("own_apps")
def test_command_map_names_each_command_by_the_module_that_registers_it():
    """`epochwise.cli.COMMANDS` (which module `main` loads for a command line) matches what each module
    registers, and the app built from every module lists exactly those commands, in `MODULES` order."""
    from epochwise import cli

    registered = {}
    for module in cli.MODULES:
        names = list(typer.main.get_command(cli.build_app((module,))).commands)
        registered.update(dict.fromkeys(names, module))
    assert registered == cli.COMMANDS
    assert list(typer.main.get_command(app).commands) == list(cli.COMMANDS)


@pytest.mark.usefixtures("own_apps")
@pytest.mark.parametrize("argv", [["convert", "--help"], ["sweep", "--help"], ["evaluate", "--help"]])
def test_a_module_with_one_command_still_takes_its_name(argv):
    """An app built from one module that registers one command stays a group: ``epochwise convert FOLD``."""
    from typer.testing import CliRunner

    from epochwise import cli

    result = CliRunner().invoke(cli.build_app(cli.modules_for(argv)), argv)
    assert result.exit_code == 0, result.output
    assert f"Usage: epochwise {argv[0]} [OPTIONS]" in " ".join(result.output.split())


def test_validate_loads_only_its_own_command_module(tmp_path):
    """``epochwise validate`` imports neither the other command modules nor the records reader or the
    settings sections it does not read (start-up figures in bench/cli_start.py)."""
    import subprocess
    import sys

    rows = tmp_path / "train.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    code = (
        f"import sys; sys.argv = ['epochwise', 'validate', {str(rows)!r}]\n"
        "from epochwise.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('epochwise.cli.', 'epochwise.records', 'epochwise.config.'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert done.stdout.splitlines()[0] == f"{rows}: ok", done.stdout
    loaded = "['epochwise.cli._help_fields', 'epochwise.cli.common', 'epochwise.cli.data']"
    assert done.stdout.splitlines()[-1] == loaded
