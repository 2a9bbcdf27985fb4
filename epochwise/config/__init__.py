"""One typed configuration for the CLI, the flows and the deployments.

Sources, lowest to highest priority: defaults in code < a records directory's own ``epochwise.yaml``
(its ``data.mapping``, for ``prepare``) < YAML file (``--config``) < presets (``--preset``, in order;
`epochwise.config.presets`) < environment (``EPOCHWISE_<SECTION>__<FIELD>``, e.g. ``EPOCHWISE_DATA__SEED=7``)
< CLI flags. An unknown key in any of them is an error naming it and the closest valid key. Each concern
has its own model (`DataConfig`, `TrainConfig`, ...) which the flows take as parameters, so a default
lives in one place only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epochwise.config.data import DataConfig, RecordMapping
    from epochwise.config.deploy import DeployConfig
    from epochwise.config.evaluate import EvaluateConfig
    from epochwise.config.harmony import HarmonyConfig
    from epochwise.config.local import LocalConfig
    from epochwise.config.ops import OpsConfig
    from epochwise.config.settings import Settings, deep_merge, load_settings
    from epochwise.config.sweep import SweepConfig
    from epochwise.config.together import TogetherConfig
    from epochwise.config.train import HyperParams, TrainConfig

__all__ = [
    "DataConfig",
    "DeployConfig",
    "EvaluateConfig",
    "HarmonyConfig",
    "HyperParams",
    "LocalConfig",
    "OpsConfig",
    "RecordMapping",
    "SECTIONS",
    "Settings",
    "SweepConfig",
    "TogetherConfig",
    "TrainConfig",
    "deep_merge",
    "load_settings",
]


def _sections() -> dict[str, Any]:
    """The section models, and `SECTIONS`: the sections of `Settings` by name (the CLI reads field
    defaults here, without Settings).

    Loaded on first use, not when the package is: ``epochwise validate`` reads only
    ``epochwise.config.data``, and importing the other sections cost a tenth of its start-up
    (bench/cli_start.py)."""
    from epochwise.config.data import DataConfig, RecordMapping
    from epochwise.config.deploy import DeployConfig
    from epochwise.config.evaluate import EvaluateConfig
    from epochwise.config.harmony import HarmonyConfig
    from epochwise.config.local import LocalConfig
    from epochwise.config.ops import OpsConfig
    from epochwise.config.sweep import SweepConfig
    from epochwise.config.together import TogetherConfig
    from epochwise.config.train import HyperParams, TrainConfig

    sections: dict[str, type] = {
        "data": DataConfig,
        "train": TrainConfig,
        "local": LocalConfig,
        "together": TogetherConfig,
        "deploy": DeployConfig,
        "harmony": HarmonyConfig,
        "ops": OpsConfig,
        "evaluate": EvaluateConfig,
        "sweep": SweepConfig,
    }
    return {model.__name__: model for model in (*sections.values(), RecordMapping, HyperParams)} | {
        "SECTIONS": sections
    }


_LAZY = ("Settings", "deep_merge", "load_settings")


def __getattr__(name: str) -> Any:
    # Building Settings builds every section's validator; only loading settings needs it (not the help).
    if name in _LAZY:
        from epochwise.config import settings

        return getattr(settings, name)
    if name in __all__:
        globals().update(_sections())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
