"""DPO and its relatives (TRL's DPOTrainer loss types: sigmoid = DPO, ipo, hinge, ...) on preference pairs.

The reference is the frozen SFT model: a second copy when the whole policy
is trained, or, with a LoRA policy, the same model with its adapters
disabled (TRL does this when it gets a peft_config and no ref_model), so no
second copy is held. Held-out pairs are scored before and after training
(implicit rewards beta * log pi/pi_ref: all zero before, by construction).
fp32 and no gradient checkpointing: this runs on CPU.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from alignment.policy import lora_config
from alignment.stages import AlignConfig
from recipes import hf_lm

# TRL's logged figures kept in the stage metrics (eval_ prefix on held-out scores).
REWARD_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _as_dataset(pairs: list[dict]) -> Dataset:
    """Return the pairs as a datasets.Dataset with TRL's prompt/chosen/rejected columns only."""
    return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def make_trainer(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train: list[dict],
    val: list[dict],
    cfg: AlignConfig,
    seed: int,
    work_dir: Path,
) -> DPOTrainer:
    """Return a DPOTrainer of `policy` against the frozen `reference` on conversational pairs.

    With cfg.lora the trainer wraps `policy` in a fresh LoRA adapter and
    `reference` must be None: the reference is the policy with adapters
    disabled. The held-out pairs are scored in a single batch, so TRL's
    logged eval figures are exact means over them.
    """
    if cfg.lora != (reference is None):
        raise ValueError("DPO takes a reference model exactly when the policy is not a LoRA (cfg.lora=False)")
    args = DPOConfig(
        output_dir=str(work_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(len(val), 1),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=hf_lm.context_length(policy, cfg.max_length),
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # new name of gradient_checkpointing, which TRL turns on by default
        dataloader_pin_memory=False,
        logging_steps=max(1, cfg.max_steps // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    if reference is not None:
        reference.requires_grad_(False).eval()
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=_as_dataset(train),
        eval_dataset=_as_dataset(val),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora_rank, cfg.lora_alpha) if cfg.lora else None,
    )


def held_out_scores(trainer: DPOTrainer) -> dict[str, float]:
    """Return TRL's DPO figures (loss, reward accuracy/margin/chosen/rejected) on the held-out pairs."""
    logged = trainer.evaluate()
    return {key: round(float(logged[f"eval_{key}"]), 5) for key in REWARD_KEYS}


def last_train_log(trainer: DPOTrainer) -> dict[str, float]:
    """Return the last logged training figures of REWARD_KEYS."""
    for entry in reversed(trainer.state.log_history):
        if "rewards/margins" in entry and "loss" in entry:
            return {key: round(float(entry[key]), 5) for key in REWARD_KEYS}
    return {}


def train_dpo(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train: list[dict],
    val: list[dict],
    cfg: AlignConfig,
    seed: int,
    work_dir: Path,
) -> tuple[PreTrainedModel, dict]:
    """DPO-train `policy`; return (the trained policy, a PeftModel with cfg.lora, and the DPO metrics).

    Metrics: TRL's held-out figures before and after (val_<key>_before/after),
    the last logged training figures (train_<key>_last), steps, train time.
    """
    trainer = make_trainer(policy, reference, tokenizer, train, val, cfg, seed, work_dir)
    before = held_out_scores(trainer)
    started = time.time()
    trainer.train()
    train_time = time.time() - started
    after = held_out_scores(trainer)
    train_last = last_train_log(trainer)
    shutil.rmtree(work_dir, ignore_errors=True)
    metrics = {
        "loss_type": cfg.loss_type,
        "steps": trainer.state.global_step,
        **{f"val_{k.replace('/', '_')}_before": v for k, v in before.items()},
        **{f"val_{k.replace('/', '_')}_after": v for k, v in after.items()},
        **{f"train_{k.replace('/', '_')}_last": v for k, v in train_last.items()},
        "train_time_s": round(train_time, 2),
    }
    return trainer.model, metrics
