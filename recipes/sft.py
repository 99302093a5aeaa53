"""The `sft` stage: LoRA (merged back) or full fine-tuning of the pretrained HF checkpoint on instructions.

Steps: fill the config from its recipe (recipes.sft_recipes); read the
user's instruction files (chat or instruction/input/output JSONL; bad records
go to rejects/) or build "continue this passage" chats from the curated
corpus (recipes.instructions); encode them with the chat template and loss on
the assistant turns only (recipes.hf_lm), truncated to max_length (chats
whose prompt leaves under a quarter of it are dropped); optionally pack
several chats per row (attention stays within each chat); score the
held-out chats; train (a peft LoRA/DoRA adapter, or every weight) with a
plain AdamW loop, scoring the held-out chats every eval_every steps; then
save the adapter in PEFT format and the merged model, or the fully tuned
model, as an HF checkpoint, plus a loss-curve PNG.

Outputs under the stage directory:

    hf/                   the fine-tuned model + tokenizer (with its chat template)
    adapter/              the LoRA/DoRA adapter in PEFT format (mode lora only)
    instructions.jsonl    exactly the train and held-out chats used
    rejects/rejects.jsonl malformed records of data_files: {"file", "line", "reason", "detail", "raw"}
    loss_curve.png        train loss per step and held-out loss
    sft_config.json       the config the stage ran with: the recipe's values filled in
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from curation.corpus import read_corpus
from curation.split import read_split
from pipeline.stage import StageContext, StageResult
from recipes import hf_lm
from recipes.data_parallel import DataParallel
from recipes.instructions import (
    build_instructions,
    chat_char_budget,
    check_rejects,
    read_user_instructions,
    select_split,
    write_jsonl,
)
from recipes.loop_checkpoint import LoopCheckpoints, latest_step, python_rng_state, set_python_rng_state
from recipes.plots import save_loss_curve
from recipes.sft_recipes import resolve_config
from recipes.stages import SFTConfig


def select_examples(records: list[dict], cfg: SFTConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, val) records: train shuffled by `seed` and capped by max_examples, val capped by eval_examples."""
    return select_split(records, seed, cfg.max_examples, cfg.eval_examples)


def load_records(ctx: StageContext, cfg: SFTConfig, max_length: int) -> tuple[list[dict], dict]:
    """Return (instruction records, counts) from cfg.data_files or the curated corpus.

    Rejects of data_files are written (by rank 0) to rejects/rejects.jsonl
    (always written, empty for the corpus); too many fail the stage.
    """
    rejects_path = ctx.out_dir / "rejects" / "rejects.jsonl"
    if ctx.is_main:
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.data_files:
        records, rejects, lines = read_user_instructions(list(cfg.data_files), ctx.seed, cfg.heldout_fraction)
        if ctx.is_main:
            write_jsonl(rejects_path, rejects)
        check_rejects(rejects, lines, cfg.max_rejects_fraction, rejects_path)
        return records, {"records_read": lines, "rejects": len(rejects)}
    if ctx.is_main:
        write_jsonl(rejects_path, [])
    docs = read_corpus(ctx.input_path("curate", "corpus"))
    split = read_split(ctx.input_path("tokenize", "split"))
    records = build_instructions(docs, ctx.seed, split.of, chat_char_budget(max_length))
    return records, {"records_read": len(records), "rejects": 0}


def load_for_training(path: Path, cfg: SFTConfig, device: torch.device) -> PreTrainedModel:
    """Return the HF checkpoint at `path` on `device`, ready to train (gradient checkpointing per cfg).

    Weights are fp32, except a LoRA base on CUDA with bf16, which is frozen
    and kept in bf16 (half the memory; peft keeps the adapter in fp32).
    """
    bf16_base = cfg.mode == "lora" and cfg.bf16 and device.type == "cuda"
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16 if bf16_base else torch.float32, local_files_only=True
    ).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


def add_lora(model: PreTrainedModel, cfg: SFTConfig) -> PeftModel:
    """Return `model` wrapped with the fresh LoRA (DoRA with cfg.use_dora) adapter of `cfg` (hf_lm.add_lora)."""
    return hf_lm.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules),
                          bool(cfg.use_dora))


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """Return bf16 autocast on CUDA when asked, else a no-op (CPU trains in fp32: bf16 is slow there)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel, rows: list[dict], pad_id: int, cfg: SFTConfig, dp: DataParallel | None = None
) -> tuple[float, int]:
    """Return (token-weighted mean NLL, scored tokens) of `rows` (from hf_lm.pack_examples) in eval mode.

    With several ranks each scores its share of the rows and the sums are added up.
    """
    dp = dp or DataParallel()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = dp.share(rows, even=False)
    total, count = 0.0, 0
    for s in tqdm(range(0, len(mine), cfg.batch_size), desc="held-out loss", leave=False, disable=not dp.is_main):
        with autocast(device, cfg.bf16):
            nll, n = hf_lm.forward_nll(model, hf_lm.collate_rows(mine[s : s + cfg.batch_size], pad_id))
        total, count = total + nll.item(), count + n
    total, count = dp.sum(total), int(dp.sum(count))
    model.train(was_training)
    if count == 0:
        raise ValueError("no scored tokens: every held-out chat is empty or fully masked")
    return total / count, count


def fine_tune(
    model: PreTrainedModel,
    rows: list[dict],
    val_rows: list[dict],
    pad_id: int,
    cfg: SFTConfig,
    seed: int,
    checkpoints: LoopCheckpoints | None = None,
) -> dict:
    """Train the trainable weights of `model` for cfg.max_steps AdamW steps; return the log.

    Log: {"train": [loss of each step], "val": [(step, held-out loss)] every
    cfg.eval_every steps and at the last, "step_time_s": mean seconds per step}.
    A step is grad_accum_steps micro-batches of batch_size rows drawn by a
    seeded permutation of `rows` (re-drawn each epoch); its loss is the mean
    cross-entropy over all labelled tokens of the step. Linear warmup, then
    linear decay to zero; gradients clipped to norm 1.

    Data parallel (recipes.data_parallel) over the ranks of the default process
    group: the same global batch whatever the world size, each rank its share of
    every micro-batch. With `checkpoints`, the loop saves periodically and
    resumes from the newest checkpoint where there is one.
    """
    checkpoints = checkpoints or LoopCheckpoints(None, 0)  # off: the default process group's world
    dp = checkpoints.dp
    dp.check_divides(cfg.batch_size, "sft.batch_size")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = hf_lm.adamw_with_schedule(params, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
    rng = random.Random(seed)
    order: list[int] = []
    log: dict = {"train": [], "val": [], "seconds": 0.0, "tokens": 0}
    resumed = checkpoints.restore({"model": model}, {"adamw": optimizer}, {"lr": schedule})
    first = 1
    if resumed:
        set_python_rng_state(rng, resumed["state"]["rng"])
        order, log, first = resumed["state"]["order"], resumed["state"]["log"], resumed["step"] + 1
        log["val"] = [tuple(v) for v in log["val"]]
    model.train()
    bar = tqdm(range(first, cfg.max_steps + 1), desc=f"sft ({cfg.mode})", initial=first - 1, total=cfg.max_steps,
               disable=not dp.is_main)
    for step in bar:
        started = time.perf_counter()
        micro = []
        for _ in range(cfg.grad_accum_steps):
            if len(order) < cfg.batch_size:
                order += rng.sample(range(len(rows)), len(rows))
            picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
            log["tokens"] += sum(len(rows[i]["input_ids"]) for i in picked)  # the global batch's, every rank
            micro.append(hf_lm.collate_rows([rows[i] for i in dp.share(picked)], pad_id))
        step_tokens = dp.sum(sum(int((b["labels"][:, 1:] != hf_lm.IGNORE).sum()) for b in micro))
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for batch in micro:
            with autocast(device, cfg.bf16):
                nll, _ = hf_lm.forward_nll(model, batch)
            (nll / max(step_tokens, 1)).backward()  # the step's mean over every labelled token of the global batch
            step_loss += nll.item() / max(step_tokens, 1)
        dp.reduce_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        log["seconds"] += time.perf_counter() - started
        log["train"].append(dp.sum(step_loss))
        bar.set_postfix(loss=f"{log['train'][-1]:.3f}")
        if step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            log["val"].append((step, heldout_loss(model, val_rows, pad_id, cfg, dp)[0]))
        if checkpoints.due(step, cfg.max_steps):
            state = {"rng": python_rng_state(rng), "order": order, "log": log}
            checkpoints.save(step, {"model": model}, {"adamw": optimizer}, {"lr": schedule}, state)
    model.eval()
    log["step_time_s"] = log["seconds"] / max(cfg.max_steps, 1)
    return log


def train_log(log: dict) -> list[dict]:
    """Return one record per step: {"step", "loss"} and "val_loss" at the steps the held-out set was scored."""
    val = dict(log["val"])
    return [{"step": s, "loss": loss} | ({"val_loss": val[s]} if s in val else {})
            for s, loss in enumerate(log["train"], start=1)]


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SFTConfig, out_dir: Path
) -> dict[str, str]:
    """Save hf/ (LoRA merged into the base, or the fully tuned model) and, for LoRA, adapter/; return the roles."""
    outputs = {}
    if cfg.mode == "lora":
        model.save_pretrained(out_dir / "adapter")
        outputs["adapter"] = "adapter"
        model = model.merge_and_unload()
    model.save_pretrained(out_dir / "hf")
    tokenizer.save_pretrained(out_dir / "hf")
    return {"hf": "hf"} | outputs


def run(ctx: StageContext) -> StageResult:
    """Read or build instructions, fine-tune the pretrain checkpoint, save hf/ (and adapter/ for LoRA).

    On several ranks (torchrun/srun) it trains data-parallel; rank 0 alone writes the outputs.
    Resumes from checkpoints/ of an interrupted run of the same fingerprint; deletes them when done.
    """
    cfg = resolve_config(ctx.config)
    if ctx.is_main:
        (ctx.out_dir / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    started = time.time()
    torch.manual_seed(ctx.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the rank's GPU: set by the runner
    base_path = ctx.input_path("pretrain", "hf")
    model = load_for_training(base_path, cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path), local_files_only=True)
    max_length = hf_lm.context_length(model, cfg.max_length)
    records, counts = load_records(ctx, cfg, max_length)
    fitting = [r for r in records if hf_lm.prompt_fits(tokenizer, r["messages"][:-1], max_length)]
    train, val = select_examples(fitting, cfg, ctx.seed)
    if not train or not val:
        raise ValueError(
            f"sft needs training and held-out instructions; {counts['records_read']} records gave "
            f"{len(train)} train and {len(val)} held-out whose prompt fits {max_length} tokens"
        )
    if ctx.is_main:
        write_jsonl(ctx.out_dir / "instructions.jsonl", train + val)  # exactly what is used
    encoded = {
        split: [hf_lm.encode_chat(tokenizer, r["messages"], max_length) for r in records]
        for split, records in (("train", train), ("val", val))
    }
    rows = hf_lm.pack_examples(encoded["train"], max_length, cfg.packing)
    val_rows = hf_lm.pack_examples(encoded["val"], max_length, False)  # one chat a row: packing changes no loss
    pad_id = tokenizer.pad_token_id
    dp = DataParallel.current()
    val_before, val_tokens = heldout_loss(model, val_rows, pad_id, cfg, dp)

    if cfg.mode == "lora":
        model = add_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train_started = time.time()
    checkpoints = LoopCheckpoints(ctx.out_dir / "checkpoints", cfg.checkpoint_every, cfg.keep_checkpoints, dp)
    checkpoints_step = latest_step(checkpoints.root)
    log = fine_tune(model, rows, val_rows, pad_id, cfg, ctx.seed, checkpoints)
    train_time = time.time() - train_started
    val_after = log["val"][-1][1] if log["val"] else val_before
    train_curve = list(enumerate(log["train"], start=1))
    outputs = {}
    if ctx.is_main:
        outputs = save_model(model, tokenizer, cfg, ctx.out_dir)
        save_loss_curve(ctx.out_dir / "loss_curve.png", train_curve, [(0, val_before)] + log["val"], "held-out",
                        "loss on answer tokens (nats/token)")
        write_jsonl(ctx.out_dir / "train_log.jsonl", train_log(log))
        shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)  # hf/ (and adapter/) hold the result
    losses = log["train"]
    train_tokens = sum(len(r["input_ids"]) for r in rows)
    metrics = {
        "recipe": cfg.recipe,
        "mode": cfg.mode,
        "use_dora": bool(cfg.use_dora and cfg.mode == "lora"),
        "packing": bool(cfg.packing),
        "records_read": counts["records_read"],
        "rejects": counts["rejects"],
        "instructions_built": len(records),
        "dropped_prompt_too_long": len(records) - len(fitting),
        "max_length": max_length,
        "train_examples": len(encoded["train"]),
        "train_rows": len(rows),
        "row_fill": round(train_tokens / (len(rows) * max_length), 4),  # tokens / (rows x max_length)
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
        "data_parallel": dp.world_size,
        "global_batch_rows": cfg.batch_size * cfg.grad_accum_steps,
        "resumed_from_step": checkpoints_step,
        "step_time_s": round(log["step_time_s"], 4),
        "train_tokens": log["tokens"],  # tokens of the rows trained on (all ranks), in the steps this run made
        "tokens_per_s": round(log["tokens"] / max(log["seconds"], 1e-9), 1),
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    if ctx.is_main:
        _print_summary(metrics)
    return StageResult(
        outputs=outputs
        | {
            "instructions": "instructions.jsonl",
            "train_log": "train_log.jsonl",
            "rejects": "rejects/rejects.jsonl",
            "loss_curve": "loss_curve.png",
            "config": "sft_config.json",
        },
        metrics=metrics,
    )


def _print_summary(metrics: dict) -> None:
    """Print the stage's key figures as a rich table."""
    merged = ", merged" if metrics["mode"] == "lora" else ""
    table = Table(title=f"sft ({metrics['recipe']}: {metrics['mode']}{merged})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "records_read",
        "rejects",
        "train_examples",
        "train_rows",
        "val_examples",
        "steps",
        "val_loss_before",
        "val_loss_after",
        "trainable_params",
        "trainable_fraction",
        "step_time_s",
        "train_time_s",
    ):
        table.add_row(key, str(metrics[key]))
    Console().print(table)
