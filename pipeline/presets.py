"""Named pipeline configs: the stage defaults plus the overrides each stage package declares.

`tiny` is the embedded default (the dataclass defaults: 2-core CPU, minutes).
`smoke` is smaller than tiny, for the end-to-end tests. A preset's overrides are
the `PRESETS[name]` lists of every registered stage module (pipeline.stage).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig, apply_overrides
from pipeline.stage import load_registry


def preset_names() -> list[str]:
    """Return the names of the presets the stage packages declare, sorted."""
    return sorted(load_registry().presets)


def resolve_configs(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Return section -> dataclass, for every registered stage, for a named preset with user overrides applied."""
    registry = load_registry()
    if preset not in registry.presets:
        raise KeyError(f"unknown config {preset!r}; choose from: {', '.join(preset_names())}")
    configs: dict[str, Any] = {"run": RunConfig()}
    for name, stage in registry.stages.items():
        configs[name] = stage.config_cls()
    apply_overrides(configs, registry.presets[preset] + list(overrides or []))
    return configs
