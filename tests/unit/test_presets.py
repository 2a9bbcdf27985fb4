"""Presets and the resolved configuration through the real CLI: composition order and priority
(file < presets in order < EPOCHWISE_* < flags), `config show`'s sources, unknown keys naming their
source and the closest valid key, and a records directory's own mapping for `prepare`."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config import LocalConfig, load_settings
from epochwise.config.data import DataConfig
from epochwise.config.presets import with_records_mapping
from tests.helpers import EXAMPLE_RECORDS, REPO, records_dir

PROJECT = "train:\n  epochs: 5\n  hyper:\n    seed: 1\nlocal:\n  seq_length: 64\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with an epochwise.yaml and two user presets, and no EPOCHWISE_* variables."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in __import__("os").environ if k.upper().startswith("EPOCHWISE_")]:
        monkeypatch.delenv(name)
    (tmp_path / "epochwise.yaml").write_text(PROJECT, encoding="utf-8")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text("train:\n  epochs: 6\nlocal:\n  seq_length: 100\n")
    (tmp_path / "presets" / "b.yaml").write_text("# b\ntrain:\n  epochs: 7\n")
    return tmp_path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def show(*args: str, env: dict[str, str] | None = None) -> dict:
    code, output = invoke("config", "show", "--json", *args, env=env)
    assert code == 0, output
    return json.loads(output)


# --- presets ---------------------------------------------------------------------------------


def test_shipped_presets_are_package_data() -> None:
    names = {entry.name for entry in resources.files("epochwise.presets").iterdir()}
    assert {"quick_test.yaml", "cpu_debug.yaml"} <= names
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.yaml" in package_data["epochwise.presets"]  # a non-editable install ships them too


def test_shipped_presets_are_valid_settings(project: Path) -> None:
    quick = show("--preset", "quick_test")["settings"]
    assert (quick["train"]["epochs"], quick["local"]["max_steps"]) == (1, 10)
    debug = show("--preset", "cpu_debug")["settings"]
    assert debug["train"]["backend"] == "local" and debug["train"]["local_model"] == "tiny"
    assert (debug["local"]["threads"], debug["local"]["device"], debug["local"]["seq_length"]) == (1, "cpu", 128)


def test_presets_compose_in_order_between_the_file_and_the_environment(project: Path) -> None:
    out = show("--preset", "a", "--preset", "b")
    assert out["settings"]["train"]["epochs"] == 7  # b, given last, wins over a and the file
    assert out["settings"]["local"]["seq_length"] == 100  # a wins over the file
    assert out["settings"]["train"]["hyper"]["seed"] == 1  # only the file sets it
    assert out["sources"]["train.epochs"] == "preset b (presets/b.yaml:3)"
    assert out["sources"]["local.seq_length"] == "preset a (presets/a.yaml:4)"
    assert out["sources"]["train.hyper.seed"] == "epochwise.yaml:4"

    assert show("--preset", "b", "--preset", "a")["settings"]["train"]["epochs"] == 6  # order matters

    env = {"EPOCHWISE_TRAIN__EPOCHS": "8"}
    out = show("--preset", "a", "--preset", "b", env=env)
    assert out["settings"]["train"]["epochs"] == 8 and out["sources"]["train.epochs"] == "EPOCHWISE_TRAIN__EPOCHS"

    out = show("--preset", "a", "--preset", "b", "--set", "train.epochs=9", env=env)
    assert out["settings"]["train"]["epochs"] == 9 and out["sources"]["train.epochs"] == "--set train.epochs"


def test_a_commands_flag_beats_presets_and_environment(project: Path) -> None:
    # The same layers through a real command: --epochs 0 is the flag's error, not the preset's value.
    code, output = invoke("train", "folds/x", "--preset", "a", "--epochs", "0", env={"EPOCHWISE_TRAIN__EPOCHS": "8"})
    assert (code, output.strip()) == (1, "--epochs: input should be greater than or equal to 1 (got 0)")


def test_a_user_preset_shadows_a_shipped_one_and_sits_beside_the_config_file(project: Path, tmp_path: Path) -> None:
    (project / "presets" / "quick_test.yaml").write_text("train:\n  epochs: 2\n")
    assert show("--preset", "quick_test")["settings"]["train"]["epochs"] == 2
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "presets").mkdir(parents=True)
    (elsewhere / "cfg.yaml").write_text("{}\n")
    (elsewhere / "presets" / "mine.yaml").write_text("train:\n  epochs: 4\n")
    out = show("--config", str(elsewhere / "cfg.yaml"), "--preset", "mine")
    assert out["settings"]["train"]["epochs"] == 4


def test_an_unknown_preset_lists_the_available_ones_and_the_closest(project: Path) -> None:
    code, output = invoke("config", "show", "--preset", "quik_test")
    assert code == 1
    assert output.strip() == (
        "unknown preset 'quik_test' (did you mean 'quick_test'?); available: a, b, cpu_debug, quick_test "
        "(your own go in presets/NAME.yaml)"
    )


def test_a_bad_value_in_a_preset_names_the_preset_file_and_line(project: Path) -> None:
    (project / "presets" / "zero.yaml").write_text("train:\n  epochs: 0\n")
    code, output = invoke("train", "folds/x", "--preset", "zero")
    assert (code, output.strip()) == (
        1,
        "presets/zero.yaml:2: train.epochs: input should be greater than or equal to 1",
    )


# --- config show -----------------------------------------------------------------------------


def test_config_show_notes_the_source_of_every_non_default_value_only(project: Path) -> None:
    code, output = invoke("config", "show", "--preset", "a", env={"EPOCHWISE_LOCAL__THREADS": "3"})
    assert code == 0, output
    lines = output.splitlines()
    assert "train:" in lines and "  epochs: 6  # from preset a (presets/a.yaml:2)" in lines
    assert "    seed: 1  # from epochwise.yaml:4" in lines
    assert "  threads: 3  # from EPOCHWISE_LOCAL__THREADS" in lines
    assert "  backend: auto" in lines  # a default: no note
    assert "  val_ratio: 0.1" in lines
    notes = [line for line in lines if "# from" in line]
    assert len(notes) == 4  # epochs, seed, seq_length, threads


def test_config_show_shows_the_records_own_mapping(project: Path) -> None:
    out = show("--records", str(EXAMPLE_RECORDS))
    assert out["settings"]["data"]["mapping"]["assistant_field"] == "context"
    assert out["sources"]["data.mapping.assistant_field"] == f"the records' {EXAMPLE_RECORDS / 'epochwise.yaml'}:7"


# --- unknown keys ----------------------------------------------------------------------------


def test_an_unknown_key_in_the_file_names_the_line_and_the_closest_key(project: Path) -> None:
    (project / "epochwise.yaml").write_text("train:\n  epoch: 2\nlocal:\n  tiny:\n    hiden_size: 3\ndatta: {}\n")
    code, output = invoke("config", "show")
    assert code == 1
    assert output.splitlines() == [
        "epochwise.yaml:2: unknown setting 'train.epoch' (did you mean 'train.epochs'?)",
        "epochwise.yaml:5: unknown setting 'local.tiny.hiden_size' (did you mean 'local.tiny.hidden_size'?)",
        "epochwise.yaml:6: unknown setting 'datta' (did you mean 'data'?)",
    ]
    # Every command that loads settings refuses it, before doing anything.
    assert invoke("validate", "x.jsonl")[0] == 1


def test_an_unknown_key_in_a_preset_names_the_preset(project: Path) -> None:
    (project / "presets" / "typo.yaml").write_text("local:\n  max_step: 3\n")
    code, output = invoke("train", "folds/x", "--preset", "typo")
    assert (code, output.strip()) == (
        1,
        "presets/typo.yaml:2: unknown setting 'local.max_step' (did you mean 'local.max_steps'?)",
    )


def test_an_unknown_epochwise_variable_is_an_error_not_ignored(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPOCHWISE_TRAIN__EPOHCS", "2")
    monkeypatch.setenv("EPOCHWISE_TRAN__EPOCHS", "2")
    monkeypatch.setenv("EPOCHWISE_TRAIN__EPOCHS__MAX", "2")
    code, output = invoke("config", "show")
    assert code == 1
    assert output.splitlines() == [
        "EPOCHWISE_TRAIN__EPOCHS__MAX: train.epochs has no settings below it",
        "EPOCHWISE_TRAIN__EPOHCS: unknown setting 'train.epohcs' (did you mean EPOCHWISE_TRAIN__EPOCHS?)",
        "EPOCHWISE_TRAN__EPOCHS: unknown setting 'tran' (did you mean EPOCHWISE_TRAIN?)",
    ]
    with pytest.raises(ValueError, match="EPOCHWISE_TRAIN__EPOHCS"):
        load_settings()  # the library refuses it as well
    monkeypatch.delenv("EPOCHWISE_TRAIN__EPOHCS")
    monkeypatch.delenv("EPOCHWISE_TRAN__EPOCHS")
    monkeypatch.delenv("EPOCHWISE_TRAIN__EPOCHS__MAX")
    monkeypatch.setenv("EPOCHWISE_CONFIG", "epochwise.yaml")  # the CLI's own variable is not a setting
    assert show()["settings"]["train"]["epochs"] == 5


# --- max_steps and the run key ---------------------------------------------------------------


def test_max_steps_is_part_of_the_run_key_only_when_set() -> None:
    assert "max_steps" not in LocalConfig().training_fields()  # keys of runs made before it are unchanged
    assert LocalConfig(max_steps=10).training_fields()["max_steps"] == 10
    assert LocalConfig(max_steps=10).training_fields() != LocalConfig().training_fields()


# --- a records directory's own mapping -------------------------------------------------------


def test_a_records_file_may_only_carry_the_mapping(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    records = records_dir(tmp_path)
    (records / "epochwise.yaml").write_text(
        "data:\n  seed: 3\n  mapping:\n    assistant_field: a\ntrain:\n  epochs: 2\n"
    )
    code, output = invoke("prepare", str(records), "--fold", str(tmp_path / "f"))
    assert code == 1
    assert output.strip() == (
        f"{records / 'epochwise.yaml'}: a records directory's epochwise.yaml may only set data.mapping "
        "(found train, data.seed); put other settings in your config file"
    )
    assert not (tmp_path / "f").exists()


def test_the_prepare_flow_fills_a_default_mapping_from_the_records(tmp_path: Path) -> None:
    # A deployment's parameters come from a config file without a mapping: the records' own applies.
    records = records_dir(tmp_path)
    filled = with_records_mapping(DataConfig(), records)
    assert (filled.mapping.user_template, filled.mapping.assistant_field) == ("Q: {q}", "a")
    assert with_records_mapping(DataConfig(), records / "r.jsonl") == filled
    chosen = DataConfig(mapping={"assistant_field": "b"})
    assert with_records_mapping(chosen, records) == chosen  # a mapping that was set is kept
    assert with_records_mapping(DataConfig(), tmp_path) == DataConfig()  # no file: unchanged
