"""Stage registrations and configs of the alignment package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class AlignConfig:
    """Settings of the `align` stage."""

    method: str = "dpo"
    max_steps: int = 60
    max_pairs: int = 0  # 0 = all


STAGES = {
    "align": Stage("align", AlignConfig, "alignment.dpo:run", inputs=("curate", "sft"), code=("alignment", "recipes")),
}
