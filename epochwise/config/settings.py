"""`Settings`: every configuration section, read from defaults, a YAML file, the environment and CLI flags.

Kept apart from the section models so that importing those (the CLI's help does) never imports
pydantic-settings; ``epochwise.config.Settings`` and ``load_settings`` load this module on first use.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from epochwise.config.data import DataConfig
from epochwise.config.deploy import DeployConfig
from epochwise.config.evaluate import EvaluateConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig


class Settings(BaseSettings):
    """All configuration sections; unknown keys are errors so typos never pass silently."""

    model_config = SettingsConfigDict(
        env_prefix="EPOCHWISE_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    together: TogetherConfig = Field(default_factory=TogetherConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    harmony: HarmonyConfig = Field(default_factory=HarmonyConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _YAML_FILE.get(None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


# The YAML path is handed to settings_customise_sources through a context variable: pydantic-settings
# builds sources from the class, and a class attribute would leak between calls.
_YAML_FILE: ContextVar[Path | None] = ContextVar("epochwise_yaml_file")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts, ``override`` winning; used to put CLI flags on top of file and environment."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build `Settings` from defaults, an optional YAML file, the environment and ``overrides`` (CLI flags).

    ``overrides`` is a nested dict holding only the flags the user actually passed.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    token = _YAML_FILE.set(Path(config_file) if config_file is not None else None)
    try:
        base = Settings()
    finally:
        _YAML_FILE.reset(token)
    if not overrides:
        return base
    return Settings.model_validate(deep_merge(base.model_dump(), overrides))
