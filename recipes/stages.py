"""Stage registrations and configs of the recipes package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class PretrainConfig:
    """Settings of the `pretrain` stage; `model` names a recipe in recipes.models."""

    model: str = "tiny"
    max_steps: int = 300
    eval_every: int = 100


@dataclasses.dataclass
class SFTConfig:
    """Settings of the `sft` stage (LoRA merged back into the base weights)."""

    max_steps: int = 100
    max_examples: int = 0  # 0 = all


@dataclasses.dataclass
class EvaluateConfig:
    """Settings of the `evaluate` stage."""

    max_batches: int = 20
    max_new_tokens: int = 32


STAGES = {
    "pretrain": Stage("pretrain", PretrainConfig, "recipes.pretrain:run", inputs=("tokenize",)),
    "sft": Stage("sft", SFTConfig, "recipes.sft:run", inputs=("curate", "pretrain")),
    "evaluate": Stage(
        "evaluate", EvaluateConfig, "recipes.evaluate:run", inputs=("tokenize", "pretrain", "sft", "align")
    ),
}
