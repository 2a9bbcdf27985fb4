"""`Settings`: every configuration section, read from defaults, YAML files, presets, the environment and flags.

Kept apart from the section models so that importing those (the CLI's help does) never builds
`Settings`; ``epochwise.config.Settings`` and ``load_settings`` load this module on first use.

Sources, lowest priority first (each one a `Layer`, so every value can be traced to what set it):
defaults in code < a records directory's own ``data.mapping`` (``prepare`` only) < the config file <
presets, in the order given < ``EPOCHWISE_*`` environment < CLI flags.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from epochwise.config.data import DataConfig
from epochwise.config.deploy import DeployConfig
from epochwise.config.evaluate import EvaluateConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.ops import OpsConfig
from epochwise.config.presets import read_yaml
from epochwise.config.sweep import SweepConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig

ENV_PREFIX = "EPOCHWISE_"
# EPOCHWISE_* variables that are not settings fields (read by the CLI itself).
NOT_SETTINGS = {"EPOCHWISE_CONFIG"}


class Settings(BaseModel):
    """All configuration sections; unknown keys are errors so typos never pass silently.

    A plain model, validated from the merged layers (`validate_layers`); only the ``EPOCHWISE_*``
    variables are read with pydantic-settings (`env_layer`), which is imported when one is set: its
    import was a third of ``epochwise validate`` in a project (bench/cli_start.py).

    A section nothing sets defaults to ``{}``, which ``validate_default`` turns into the section through
    this model's own validator: a section class as the factory would build that section's validator
    too (deferred, see `epochwise.config.base.Section`), 5 of the 7 ms of a first `Settings()`.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)  # as pydantic-settings' BaseSettings

    data: DataConfig = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=dict)
    local: LocalConfig = Field(default_factory=dict)
    together: TogetherConfig = Field(default_factory=dict)
    deploy: DeployConfig = Field(default_factory=dict)
    harmony: HarmonyConfig = Field(default_factory=dict)
    ops: OpsConfig = Field(default_factory=dict)
    evaluate: EvaluateConfig = Field(default_factory=dict)
    sweep: SweepConfig = Field(default_factory=dict)


@functools.cache
def env_settings() -> type[BaseModel]:
    """`Settings` as a pydantic-settings class, for its `EnvSettingsSource` to read the environment with."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class EnvSettings(BaseSettings, Settings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
        )

    return EnvSettings


LayerKind = Literal["records", "file", "preset", "env", "flag"]


@dataclass(frozen=True)
class Layer:
    """One source of settings: its kind, a name for messages, the file it came from and its nested values."""

    kind: LayerKind
    name: str
    values: dict[str, Any]
    path: Path | None = None
    label: str | None = None  # a preset's name as given to --preset


@dataclass
class Resolved:
    """Validated settings and the layers they were built from, lowest priority first."""

    settings: Settings
    layers: list[Layer] = field(default_factory=list)

    def source(self, loc: list[str] | tuple[str, ...]) -> tuple[Layer, list[str]] | None:
        """The highest-priority layer that sets ``loc``, with the key path it sets.

        A layer sets ``loc`` when it holds the whole path, or a value that is not a section on the way
        (pydantic's error locations may go below the key, e.g. ``train.hyper.batch_size.int``).
        """
        for layer in reversed(self.layers):
            node: Any = layer.values
            for depth, key in enumerate(loc):
                if not isinstance(node, dict) or key not in node:
                    break
                node = node[key]
                if depth + 1 == len(loc) or not isinstance(node, dict):
                    return layer, list(loc[: depth + 1])
        return None


class UnknownSettingError(ValueError):
    """Keys that name no settings field; one ``SOURCE: ...`` line per key."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts, ``override`` winning; how each layer is put over the ones below it."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def section_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The model of field ``key`` when it is itself a section (a nested model), else None."""
    annotation = model.model_fields[key].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def unknown_keys(values: dict[str, Any], model: type[BaseModel] = Settings) -> list[tuple[list[str], str | None]]:
    """Each key path of ``values`` that names no field, with the closest valid name at that level."""
    found: list[tuple[list[str], str | None]] = []
    for key, value in values.items():
        if key not in model.model_fields:
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1, cutoff=0.6)
            found.append(([str(key)], close[0] if close else None))
            continue
        nested = section_model(model, key)
        if nested is not None and isinstance(value, dict):
            found.extend(([key, *loc], close) for loc, close in unknown_keys(value, nested))
    return found


def env_unknown(environ: dict[str, str] | None = None) -> list[str]:
    """``EPOCHWISE_*`` variables that name no field (pydantic-settings ignores them), as error lines."""
    lines = []
    for name in sorted(environ if environ is not None else os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS:
            continue
        loc = upper.removeprefix(ENV_PREFIX).lower().split("__")
        model: type[BaseModel] | None = Settings
        for depth, key in enumerate(loc):
            if model is None:  # a path below a plain value (EPOCHWISE_TRAIN__EPOCHS__X)
                lines.append(f"{name}: {'.'.join(loc[:depth])} has no settings below it")
                break
            if key not in model.model_fields:
                close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
                hint = f" (did you mean {ENV_PREFIX}{'__'.join([*loc[:depth], close[0]]).upper()}?)" if close else ""
                lines.append(f"{name}: unknown setting {'.'.join(loc[: depth + 1])!r}{hint}")
                break
            model = section_model(model, key)
    return lines


def unknown_lines(layer: Layer, line_of: Any = None) -> list[str]:
    """Error lines for the unknown keys of a file or preset layer, ``path:line: ...``."""
    lines = []
    for loc, close in unknown_keys(layer.values):
        line = line_of(layer.path, loc) if line_of is not None and layer.path is not None else None
        where = f"{layer.name}{'' if line is None else f':{line}'}"
        hint = f" (did you mean {'.'.join([*loc[:-1], close])!r}?)" if close else ""
        lines.append(f"{where}: unknown setting {'.'.join(loc)!r}{hint}")
    return lines


def env_layer() -> Layer:
    """The ``EPOCHWISE_*`` variables as nested values, parsed the way pydantic-settings parses them."""
    values: dict[str, Any] = {}
    if any(name.upper().startswith(ENV_PREFIX) and name.upper() not in NOT_SETTINGS for name in os.environ):
        from pydantic_settings import EnvSettingsSource

        values = EnvSettingsSource(env_settings())()
    return Layer("env", "environment", {k: v for k, v in values.items() if v is not None})


def file_layer(kind: LayerKind, name: str, path: Path, label: str | None = None) -> Layer:
    return Layer(kind, name, read_yaml(path), path, label)


def read_layers(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    presets: list[Path] | None = None,
    records_file: Path | None = None,
    line_of: Any = None,
) -> list[Layer]:
    """Read every layer, lowest priority first; unknown keys are an error naming their source and the
    closest valid key.

    ``presets`` are preset files, lowest priority first (`epochwise.config.presets.find_preset`);
    ``records_file`` is a records directory's own ``epochwise.yaml``, of which only ``data.mapping``
    is read; ``line_of(path, loc)`` gives the line of a key in a YAML file for messages.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    layers: list[Layer] = []
    if records_file is not None and (
        config_file is None or Path(records_file).resolve() != Path(config_file).resolve()
    ):
        records = file_layer("records", str(records_file), Path(records_file))
        other = [k for k in records.values if k != "data"] + [
            f"data.{k}" for k in records.values.get("data", {}) or {} if k != "mapping"
        ]
        if other:
            raise ValueError(
                f"{records_file}: a records directory's epochwise.yaml may only set data.mapping "
                f"(found {', '.join(other)}); put other settings in your config file"
            )
        layers.append(records)
    if config_file is not None:
        layers.append(file_layer("file", str(config_file), Path(config_file)))
    for preset in presets or []:
        layers.append(file_layer("preset", str(preset), Path(preset), Path(preset).stem))
    problems = [line for layer in layers for line in unknown_lines(layer, line_of)] + env_unknown()
    if problems:
        raise UnknownSettingError(problems)
    layers.append(env_layer())
    if overrides:
        layers.append(Layer("flag", "flags", overrides))
    return layers


def validate_layers(layers: list[Layer]) -> Resolved:
    """Merge the layers (later wins) and validate them into `Settings` (a pydantic ValidationError if bad)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer.values)
    return Resolved(Settings.model_validate(merged), layers)


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    presets: list[Path] | None = None,
    records_file: Path | None = None,
) -> Settings:
    """Build `Settings` from defaults, the records' mapping, a YAML file, presets, the environment and
    ``overrides`` (CLI flags: a nested dict holding only the flags the user actually passed)."""
    return validate_layers(read_layers(config_file, overrides, presets, records_file)).settings
