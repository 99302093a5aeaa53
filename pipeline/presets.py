"""Named pipeline configs: the stage defaults plus a list of overrides.

`tiny` is the embedded default (the dataclass defaults: 2-core CPU, minutes).
`smoke` is smaller than tiny, for the end-to-end test of the whole chain.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig, apply_overrides
from pipeline import stage as registry
from pipeline.stage import get_stage

PRESETS: dict[str, list[str]] = {
    "tiny": [],
    "smoke": [
        "curate.max_docs=400",
        "tokenize.vocab_size=512",
        "pretrain.model=micro",
        "pretrain.max_steps=20",
        "pretrain.eval_every=10",
        "sft.max_steps=10",
        "sft.max_examples=64",
        "align.max_steps=5",
        "align.max_pairs=32",
        "evaluate.max_batches=2",
        "evaluate.max_new_tokens=8",
        "serve.max_tokens=8",
    ],
}


def resolve_configs(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Return section -> dataclass for a named preset with user overrides applied."""
    if preset not in PRESETS:
        raise KeyError(f"unknown config {preset!r}; choose from: {', '.join(PRESETS)}")
    configs: dict[str, Any] = {"run": RunConfig()}
    for name in registry.STAGE_MODULES:
        configs[name] = get_stage(name).config_cls()
    apply_overrides(configs, PRESETS[preset] + list(overrides or []))
    return configs
