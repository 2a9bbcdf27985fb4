"""Presets shipped with epochwise: YAML overlays applied with ``--preset NAME`` (see `epochwise.config.presets`)."""
