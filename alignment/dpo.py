"""The `align` stage: DPO of the SFT model with TRL's DPOTrainer, the SFT model frozen as reference.

Steps: build preference pairs from the curated corpus
(alignment.preference_data), keep those whose prompt leaves a quarter of the
model's positions to the answers, score the held-out pairs (implicit rewards
beta * log pi/pi_ref: all zero before training, by construction), train the
whole policy with DPO for max_steps, score again, save the policy as an HF
checkpoint. fp32 and no gradient checkpointing: this runs on CPU.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from datasets import Dataset
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from alignment.preference_data import build_pairs
from alignment.stages import AlignConfig
from pipeline.stage import StageContext, StageResult
from recipes import hf_lm
from recipes.instructions import chat_char_budget, read_corpus, write_jsonl

METHODS = ("dpo",)
# TRL's logged figures kept in the stage metrics (eval_ prefix on held-out scores).
REWARD_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def check_method(cfg: AlignConfig) -> None:
    """Raise ValueError unless cfg.method is an alignment method this stage implements."""
    if cfg.method not in METHODS:
        raise ValueError(
            f"align.method={cfg.method!r} is not implemented; available: {', '.join(METHODS)} "
            "(reward models, PPO, GRPO and SteerLM are planned, not built)"
        )


def select_pairs(records: list[dict], cfg: AlignConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, val) pairs: train shuffled by `seed` and capped by max_pairs, val capped by eval_pairs."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    random.Random(seed).shuffle(train)
    if cfg.max_pairs:
        train = train[: cfg.max_pairs]
    return train, val[: cfg.eval_pairs]


def _as_dataset(pairs: list[dict]) -> Dataset:
    """Return the pairs as a datasets.Dataset with TRL's prompt/chosen/rejected columns only."""
    return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def make_trainer(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[dict],
    val: list[dict],
    cfg: AlignConfig,
    seed: int,
    work_dir: Path,
) -> DPOTrainer:
    """Return a DPOTrainer of `policy` against the frozen `reference` on conversational pairs.

    The held-out pairs are scored in a single batch, so TRL's logged eval
    figures are exact means over them.
    """
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
    reference.requires_grad_(False)
    return DPOTrainer(
        model=policy,
        ref_model=reference.eval(),
        args=args,
        train_dataset=_as_dataset(train),
        eval_dataset=_as_dataset(val),
        processing_class=tokenizer,
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


def run(ctx: StageContext) -> StageResult:
    """Build preference pairs, DPO-train the SFT model against its frozen copy, save hf/."""
    cfg: AlignConfig = ctx.config
    check_method(cfg)
    started = time.time()
    docs = read_corpus(ctx.input_path("curate", "corpus"))
    sft_path = ctx.input_path("sft", "hf")
    policy, tokenizer = hf_lm.load_causal_lm(sft_path)
    reference, _ = hf_lm.load_causal_lm(sft_path)
    max_length = hf_lm.context_length(policy, cfg.max_length)
    built = build_pairs(docs, ctx.seed, cfg.heldout_fraction, cfg.rejected, chat_char_budget(max_length))
    fitting = [p for p in built if hf_lm.prompt_fits(tokenizer, p["prompt"], max_length)]
    train_pairs, val_pairs = select_pairs(fitting, cfg, ctx.seed)
    if not train_pairs or not val_pairs:
        raise ValueError(
            f"align needs training and held-out pairs; the corpus ({len(docs)} documents) gave "
            f"{len(train_pairs)} train and {len(val_pairs)} held-out whose prompt fits {max_length} tokens"
        )
    write_jsonl(ctx.out_dir / "pairs.jsonl", train_pairs + val_pairs)  # exactly what is used
    work_dir = ctx.out_dir / "trainer"
    trainer = make_trainer(policy, reference, tokenizer, train_pairs, val_pairs, cfg, ctx.seed, work_dir)
    before = held_out_scores(trainer)
    train_started = time.time()
    trainer.train()
    train_time = time.time() - train_started
    after = held_out_scores(trainer)
    train_last = last_train_log(trainer)
    shutil.rmtree(work_dir, ignore_errors=True)

    policy.save_pretrained(ctx.out_dir / "hf")
    tokenizer.save_pretrained(ctx.out_dir / "hf")

    metrics = {
        "method": cfg.method,
        "loss_type": cfg.loss_type,
        "pairs_built": len(built),
        "dropped_prompt_too_long": len(built) - len(fitting),
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "max_length": max_length,  # TRL keeps the start of prompt + answer within it
        "steps": trainer.state.global_step,
        **{f"val_{k.replace('/', '_')}_before": v for k, v in before.items()},
        **{f"val_{k.replace('/', '_')}_after": v for k, v in after.items()},
        **{f"train_{k.replace('/', '_')}_last": v for k, v in train_last.items()},
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    _print_summary(before, after, metrics)
    return StageResult(outputs={"hf": "hf", "pairs": "pairs.jsonl"}, metrics=metrics)


def _print_summary(before: dict, after: dict, metrics: dict) -> None:
    """Print held-out DPO figures before/after as a rich table."""
    table = Table(
        title=f"align ({metrics['method']}, {metrics['loss_type']}): "
        f"{metrics['steps']} steps, {metrics['train_pairs']} pairs, {metrics['val_pairs']} held out"
    )
    table.add_column("held-out")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in REWARD_KEYS:
        table.add_row(key, f"{before[key]:.4f}", f"{after[key]:.4f}")
    Console().print(table)
