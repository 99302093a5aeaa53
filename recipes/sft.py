"""The `sft` stage: LoRA instruction tuning of the pretrained HF checkpoint, merged back into it.

Steps: build "continue this passage" chats from the curated corpus
(recipes.instructions), encode them with the chat template and loss on the
assistant turns only (recipes.hf_lm), truncated to the model's positions
(chats whose prompt leaves under a quarter of them are dropped), score the
held-out chats, train a peft LoRA adapter with a plain AdamW loop, score
again, then save the adapter in PEFT format and the merged model as an HF
checkpoint.
"""

from __future__ import annotations

import random
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.stage import StageContext, StageResult
from recipes import hf_lm
from recipes.instructions import build_instructions, chat_char_budget, read_corpus, write_jsonl
from recipes.stages import SFTConfig


def select_examples(records: list[dict], cfg: SFTConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, val) records: train shuffled by `seed` and capped by max_examples, val capped by eval_examples."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    random.Random(seed).shuffle(train)
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    return train, val[: cfg.eval_examples]


def add_lora(model: PreTrainedModel, cfg: SFTConfig) -> PeftModel:
    """Return `model` wrapped with a fresh LoRA adapter (only the adapter is trainable)."""
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train_lora(model: PeftModel, examples: list[dict], pad_id: int, cfg: SFTConfig, seed: int) -> list[float]:
    """Train the adapter of `model` for cfg.max_steps AdamW steps; return the loss of each step.

    Batches are drawn by a seeded permutation of `examples` (re-drawn each
    epoch); the loss is the model's mean cross-entropy over labelled tokens.
    Linear warmup, then linear decay to zero.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    warmup, total = max(cfg.warmup_steps, 1), max(cfg.max_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(total - warmup, 1)))
    )
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in tqdm(range(cfg.max_steps), desc="sft (LoRA)"):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = hf_lm.pad_batch([examples[i] for i in picked], pad_id)
        loss = model(**batch).loss  # mean NLL over tokens with a label
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def run(ctx: StageContext) -> StageResult:
    """Build instructions, LoRA-tune the pretrain checkpoint, save adapter/ and merged hf/."""
    cfg: SFTConfig = ctx.config
    started = time.time()
    torch.manual_seed(ctx.seed)
    docs = read_corpus(ctx.input_path("curate", "corpus"))
    model, tokenizer = hf_lm.load_causal_lm(ctx.input_path("pretrain", "hf"))
    max_length = hf_lm.context_length(model, cfg.max_length)
    built = build_instructions(docs, ctx.seed, cfg.heldout_fraction, chat_char_budget(max_length))
    fitting = [r for r in built if hf_lm.prompt_fits(tokenizer, r["messages"][:-1], max_length)]
    train, val = select_examples(fitting, cfg, ctx.seed)
    if not train or not val:
        raise ValueError(
            f"sft needs training and held-out instructions; the corpus ({len(docs)} documents) gave "
            f"{len(train)} train and {len(val)} held-out whose prompt fits {max_length} tokens"
        )
    write_jsonl(ctx.out_dir / "instructions.jsonl", train + val)  # exactly what is used
    encoded = {
        split: [hf_lm.encode_chat(tokenizer, r["messages"], max_length) for r in records]
        for split, records in (("train", train), ("val", val))
    }
    pad_id = tokenizer.pad_token_id
    val_before, val_tokens = hf_lm.mean_nll(model, encoded["val"], pad_id, cfg.batch_size, desc="held-out loss")

    model = add_lora(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    train_started = time.time()
    losses = train_lora(model, encoded["train"], pad_id, cfg, ctx.seed)
    train_time = time.time() - train_started
    val_after, _ = hf_lm.mean_nll(model, encoded["val"], pad_id, cfg.batch_size, desc="held-out loss")

    model.save_pretrained(ctx.out_dir / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(ctx.out_dir / "hf")
    tokenizer.save_pretrained(ctx.out_dir / "hf")

    metrics = {
        "instructions_built": len(built),
        "dropped_prompt_too_long": len(built) - len(fitting),
        "max_length": max_length,
        "train_examples": len(encoded["train"]),
        "val_examples": len(encoded["val"]),
        "val_tokens": val_tokens,
        "val_loss_before": round(val_before, 4),
        "val_loss_after": round(val_after, 4),
        # mean loss of the first and of the last (up to) 10 steps: one batch alone is noisy
        "train_loss_start": round(sum(losses[:10]) / len(losses[:10]), 4) if losses else None,
        "train_loss_end": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
        "steps": len(losses),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": round(trainable / total, 5),
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    _print_summary(metrics)
    return StageResult(
        outputs={"hf": "hf", "adapter": "adapter", "instructions": "instructions.jsonl"},
        metrics=metrics,
    )


def _print_summary(metrics: dict) -> None:
    """Print the stage's key figures as a rich table."""
    table = Table(title="sft (LoRA, merged)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "train_examples",
        "val_examples",
        "steps",
        "val_loss_before",
        "val_loss_after",
        "trainable_params",
        "trainable_fraction",
        "train_time_s",
    ):
        table.add_row(key, str(metrics[key]))
    Console().print(table)
