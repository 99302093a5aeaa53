"""Stage registrations and configs of the alignment package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class AlignConfig:
    """Settings of the `align` stage: a reward model, then the SFT model aligned by `method`.

    Every method trains the reward model (it judges all of them: score and win
    rate against the SFT model on held-out prompts) and keeps the SFT model
    frozen as the reference.
    """

    method: str = "dpo"  # dpo | ppo | grpo | steerlm
    # preference data
    pairs_files: tuple[str, ...] = ()  # JSONL {prompt, chosen, rejected}, text or chat form; () = from the corpus
    max_pairs: int = 0  # training pairs used; 0 = all
    eval_pairs: int = 32  # held-out pairs scored before and after
    heldout_fraction: float = 0.1  # share of pairs_files lines without a split held out (corpus: tokenize's split)
    rejected: str = "shuffled"  # corpus-built pairs: corruption of the rejected answer: shuffled | unrelated
    max_length: int = 256  # tokens of prompt + answer (capped by the model's positions)
    batch_size: int = 4  # pairs (dpo, reward model) or sequences (ppo/grpo minibatch, steerlm) per step
    # the policy
    max_steps: int = 60  # optimizer steps of dpo
    learning_rate: float = 5e-5  # policy learning rate of dpo, ppo and grpo
    warmup_steps: int = 5
    lora: bool = False  # train the policy as a LoRA adapter; the reference is then its base, adapters disabled
    lora_rank: int = 8
    lora_alpha: int = 16
    # DPO
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge (SLiC), as TRL computes them
    beta: float = 0.1
    # reward model (and the models initialised like it: PPO's critic, SteerLM's attribute model)
    rm_steps: int = 60
    rm_learning_rate: float = 2e-4  # also the critic's
    # rollouts and the judge
    max_new_tokens: int = 32
    judge_prompts: int = 32  # held-out prompts answered by the SFT and the aligned model
    # PPO and GRPO
    reward_fn: str = ""  # "" = the reward model; else "package.module:function"(prompts, completions) -> floats
    rl_iterations: int = 20  # rollout + update rounds
    rollout_size: int = 16  # responses sampled per iteration (grpo: rollout_size // group_size prompts)
    ppo_epochs: int = 2  # passes over each rollout
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    gamma: float = 1.0
    gae_lambda: float = 0.95
    kl_coef: float = 0.05  # KL penalty (ppo: in the reward; grpo: in the loss)
    kl_target: float = 0.0  # ppo: > 0 adapts kl_coef toward this KL per response; 0 keeps it fixed
    kl_horizon: int = 1000  # ppo: samples over which the adaptive coefficient moves by up to 20%
    group_size: int = 4  # grpo: responses per prompt
    # SteerLM
    attribute_steps: int = 200  # attribute-prediction model (lr: rm_learning_rate)
    steer_labels: str = "rules"  # labels of the conditioned SFT: rules | model (the attribute model's predictions)
    steer_steps: int = 400  # attribute-conditioned SFT steps (a tiny model needs hundreds to heed the attributes)
    steer_learning_rate: float = 5e-4  # its learning rate (whole model; about 10x more for a LoRA policy)
    steer_helpfulness: int = 4  # attribute values (0-4) requested when the steered model is judged
    steer_verbosity: int = 2
    # checkpoints (every training phase: reward model, the method's own)
    checkpoint_every: int = 20  # steps (ppo/grpo: iterations) between resumable checkpoints, and at each phase's end
    keep_checkpoints: int = 2  # newest kept per phase under checkpoints/ (deleted once hf/ is saved)


STAGES = {
    "align": Stage(
        "align",
        AlignConfig,
        "alignment.align_stage:run",
        inputs=("curate", "tokenize", "sft"),
        code=("alignment", "recipes"),
        path_fields=("pairs_files",),
        key_metrics=("method", "rm_val_accuracy", "win_rate_vs_sft", "kl_from_reference", "steps"),
        multi_rank=True,
    ),
}

# Named configs: this package's overrides (tiny = the dataclass defaults).
PRESETS = {"tiny": [], "smoke": ["align.max_steps=5", "align.max_pairs=32"]}
