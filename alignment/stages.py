"""Stage registrations and configs of the alignment package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class AlignConfig:
    """Settings of the `align` stage (DPO with TRL against the frozen SFT model)."""

    method: str = "dpo"  # the only method so far
    loss_type: str = "sigmoid"  # a TRL DPO loss: sigmoid (DPO), ipo, hinge, robust, ...
    beta: float = 0.1
    max_steps: int = 60
    max_pairs: int = 0  # training pairs used; 0 = all
    eval_pairs: int = 32  # held-out pairs scored before and after
    heldout_fraction: float = 0.1  # share of documents whose pair is held out
    rejected: str = "shuffled"  # corruption of the rejected answer: shuffled | unrelated
    batch_size: int = 4  # pairs per step
    learning_rate: float = 5e-5
    warmup_steps: int = 5
    max_length: int = 256  # tokens of prompt + answer (capped by the model's positions)


STAGES = {
    "align": Stage("align", AlignConfig, "alignment.dpo:run", inputs=("curate", "sft"), code=("alignment", "recipes"),
                   key_metrics=("method", "val_rewards_accuracies_after", "val_rewards_margins_after", "steps")),
}
