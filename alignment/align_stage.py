"""The `align` stage: a reward model, then the SFT model aligned by DPO, PPO, GRPO or SteerLM, then judged.

Steps, for every method:
  1. preference pairs: built from the curated corpus (alignment.preference_data) or read from
     align.pairs_files; those whose prompt leaves a quarter of the model's positions to the answer;
  2. reward model trained on the training pairs (Bradley-Terry), accuracy on the held-out pairs;
  3. the method (SFT model frozen as reference: a second copy, or the LoRA policy's base):
     dpo (ipo, hinge): our loop, losses checked against TRL's; ppo: with a critic initialised from
     the reward model; grpo; steerlm: attribute model + attribute-conditioned SFT;
  4. judge: aligned against SFT model on held-out prompts (reward-model score, win rate), KL from
     the reference, wall time;
  5. save the policy (merged when LoRA) as the HF checkpoint `hf/` the evaluate and export stages read.

On several ranks (torchrun/srun) every training phase is data-parallel
(recipes.data_parallel; PPO/GRPO: alignment.rl_loop) with the same global
batches as one process; rank 0 alone writes outputs, judges and saves. Every
phase checkpoints under checkpoints/<phase>/ every checkpoint_every steps and
at its end (recipes.loop_checkpoint), so a killed stage re-run with the same
command resumes where it stopped; checkpoints/ is deleted once hf/ is saved.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignment import steerlm
from alignment.dpo import REWARD_KEYS, check_loss_type, train_dpo
from alignment.grpo import train_grpo
from alignment.judge import judge
from alignment.policy import Reference, load_policy, prompt_ids
from alignment.ppo import train_ppo
from alignment.preference_data import build_pairs, read_user_pairs
from alignment.reward_model import (
    LoopSettings, encode_pairs, load_scoring_model, pairwise_accuracy, train_reward_model,
)
from alignment.rewards import RewardFn, function_reward, import_function, model_reward
from alignment.rl_loop import RLTask
from alignment.stages import AlignConfig
from curation.corpus import read_corpus
from curation.split import read_split
from pipeline.stage import StageContext, StageResult
from recipes import hf_lm
from recipes.data_parallel import DataParallel
from recipes.instructions import chat_char_budget, select_split, write_jsonl
from recipes.loop_checkpoint import LoopCheckpoints, latest_step

METHODS = ("dpo", "ppo", "grpo", "steerlm")


@dataclasses.dataclass
class Aligned:
    """What a method hands to the judge: the trained policy, its reference, its figures and extra outputs."""

    policy: PreTrainedModel  # a PeftModel when trained as LoRA
    reference: Reference
    metrics: dict
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> path under out_dir
    judged_prompt: dict | None = None  # steerlm: the attribute values requested when judged
    log: list[dict] = dataclasses.field(default_factory=list)  # per-step records of its training phases


def phase_log(phase: str, losses: list[float]) -> list[dict]:
    """Return the train_log.jsonl records {"phase", "step", "loss"} of a phase's per-step losses."""
    return [{"phase": phase, "step": step, "loss": loss} for step, loss in enumerate(losses, start=1)]


def check_config(cfg: AlignConfig) -> None:
    """Raise ValueError for a method or setting the stage cannot run."""
    if cfg.method not in METHODS:
        raise ValueError(f"align.method={cfg.method!r} is not implemented; available: {', '.join(METHODS)}")
    if cfg.method == "dpo":
        check_loss_type(cfg.loss_type)
    if cfg.method == "grpo" and cfg.group_size < 2:
        raise ValueError("align.group_size must be at least 2: GRPO compares responses within a group")
    if cfg.reward_fn:
        if cfg.method not in ("ppo", "grpo"):
            raise ValueError(f"align.reward_fn applies to ppo and grpo, not {cfg.method}")
        import_function(cfg.reward_fn)  # fail before any training when it cannot be imported
    if cfg.steer_labels not in ("rules", "model"):
        raise ValueError(f"align.steer_labels={cfg.steer_labels!r}: choose rules or model")
    for name in ("steer_helpfulness", "steer_verbosity"):
        if not 0 <= getattr(cfg, name) < steerlm.LEVELS:
            raise ValueError(f"align.{name} must be an attribute level 0..{steerlm.LEVELS - 1}")


def select_pairs(records: list[dict], cfg: AlignConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train, val) pairs: train shuffled by `seed` and capped by max_pairs, val capped by eval_pairs."""
    return select_split(records, seed, cfg.max_pairs, cfg.eval_pairs)


def load_pairs(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list, list, dict]:
    """Return (train pairs, held-out pairs, counts) from pairs_files or the corpus, prompts that fit only."""
    cfg: AlignConfig = ctx.config
    if cfg.pairs_files:
        built = read_user_pairs(list(cfg.pairs_files), ctx.seed, cfg.heldout_fraction)
        source = f"{len(cfg.pairs_files)} pairs file(s)"
    else:
        docs = read_corpus(ctx.input_path("curate", "corpus"))
        split = read_split(ctx.input_path("tokenize", "split"))
        built = build_pairs(docs, ctx.seed, split.of, cfg.rejected, chat_char_budget(max_length))
        source = f"the corpus ({len(docs)} documents)"
    fitting = [p for p in built if hf_lm.prompt_fits(tokenizer, p["prompt"], max_length)]
    train, val = select_pairs(fitting, cfg, ctx.seed)
    if not train or not val:
        raise ValueError(
            f"align needs training and held-out pairs; {source} gave "
            f"{len(train)} train and {len(val)} held-out whose prompt fits {max_length} tokens"
        )
    return train, val, {"pairs_built": len(built), "dropped_prompt_too_long": len(built) - len(fitting)}


def phase_checkpoints(ctx: StageContext, phase: str) -> LoopCheckpoints:
    """Return the checkpoints of training phase `phase` (reward_model, dpo, ppo, ...) under checkpoints/."""
    cfg: AlignConfig = ctx.config
    return LoopCheckpoints(ctx.out_dir / "checkpoints" / phase, cfg.checkpoint_every, cfg.keep_checkpoints)


def save_hf(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Save `model` and `tokenizer` as the HF checkpoint `name/` (rank 0), then let every rank read it."""
    if ctx.is_main:
        model.save_pretrained(ctx.out_dir / name)
        tokenizer.save_pretrained(ctx.out_dir / name)
    DataParallel.current().barrier()


def fit_reward_model(
    sft_path: Path, tokenizer: PreTrainedTokenizerBase, train: list, val: list, cfg: AlignConfig, seed: int,
    checkpoints: LoopCheckpoints | None = None,
) -> tuple[PreTrainedModel, dict, list[float]]:
    """Return (reward model trained on `train`, its figures: held-out accuracy and margin before/after, loss;
    its per-step losses)."""
    model = load_scoring_model(sft_path)
    max_length = hf_lm.context_length(model, cfg.max_length)
    train_ex, val_ex = encode_pairs(tokenizer, train, max_length), encode_pairs(tokenizer, val, max_length)
    pad_id = tokenizer.pad_token_id
    before = pairwise_accuracy(model, val_ex, pad_id, cfg.batch_size)
    started = time.time()
    losses = train_reward_model(model, train_ex, pad_id,
                                LoopSettings(cfg.rm_steps, cfg.batch_size, cfg.rm_learning_rate, seed, checkpoints))
    after = pairwise_accuracy(model, val_ex, pad_id, cfg.batch_size)
    tail = losses[-10:]
    return model, {
        "rm_val_accuracy_before": round(before["accuracy"], 4),
        "rm_val_accuracy": round(after["accuracy"], 4),
        "rm_val_margin": round(after["margin"], 4),
        "rm_train_loss_end": round(sum(tail) / len(tail), 4) if tail else None,
        "rm_steps": len(losses),
        "rm_train_time_s": round(time.time() - started, 2),
    }, losses


def policy_and_reference(sft_path: Path, cfg: AlignConfig) -> tuple[PreTrainedModel, Reference]:
    """Return the policy to train (LoRA-wrapped with cfg.lora) and its frozen reference (no copy with LoRA)."""
    policy, _ = load_policy(sft_path)
    if cfg.lora:
        policy = hf_lm.add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        return policy, Reference(policy)
    return policy, Reference(policy, load_policy(sft_path)[0])


def rl_reward(cfg: AlignConfig, reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> RewardFn:
    """Return the reward PPO/GRPO optimise: the reward model's, or the Python function cfg.reward_fn."""
    if cfg.reward_fn:
        return function_reward(import_function(cfg.reward_fn), tokenizer)
    return model_reward(reward_model)


def rl_summary(log: list[dict]) -> dict:
    """Return the first and last iteration's reward, KL, entropy (and value loss where logged)."""
    keys = [k for k in ("reward", "kl", "entropy", "value_loss") if k in log[0]]
    ends = (("first", log[0]), ("last", log[-1]))
    return {f"rl_{k}_{when}": round(entry[k], 4) for when, entry in ends for k in keys}


def align_dpo(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, train: list, val: list) -> Aligned:
    """DPO (reference: a frozen copy, or the LoRA policy with adapters disabled)."""
    cfg: AlignConfig = ctx.config
    policy, reference = policy_and_reference(ctx.input_path("sft", "hf"), cfg)
    metrics, losses = train_dpo(policy, reference, tokenizer, train, val, cfg, ctx.seed, phase_checkpoints(ctx, "dpo"))
    return Aligned(policy, reference, metrics, log=phase_log("dpo", losses))


def align_rl(
    ctx: StageContext, tokenizer: PreTrainedTokenizerBase, train: list, reward_model: PreTrainedModel, new_tokens: int
) -> Aligned:
    """PPO (critic initialised from the reward model, saved as `critic/`) or GRPO, on the training prompts."""
    cfg: AlignConfig = ctx.config
    sft_path = ctx.input_path("sft", "hf")
    policy, reference = policy_and_reference(sft_path, cfg)
    reward = rl_reward(cfg, reward_model, tokenizer)
    task = RLTask([prompt_ids(tokenizer, p["prompt"]) for p in train], reward, reference,
                  tokenizer.eos_token_id, tokenizer.pad_token_id)
    rl_cfg = dataclasses.replace(cfg, max_new_tokens=new_tokens)
    started = time.time()
    outputs = {}
    checkpoints = phase_checkpoints(ctx, cfg.method)
    if cfg.method == "ppo":
        critic = load_scoring_model(ctx.out_dir / "reward_model")
        log = train_ppo(policy, critic, task, rl_cfg, ctx.seed, checkpoints)
        save_hf(ctx, critic, tokenizer, "critic")
        outputs["critic"] = "critic"
    else:
        log = train_grpo(policy, task, rl_cfg, ctx.seed, checkpoints)
    metrics = {
        "rl_reward_source": cfg.reward_fn or "reward_model",
        "steps": len(log),
        **rl_summary(log),
        "train_time_s": round(time.time() - started, 2),
    }
    records = [{"phase": cfg.method, "step": entry["iteration"] + 1, **entry} for entry in log]
    return Aligned(policy, reference, metrics, outputs, log=records)


def align_steerlm(
    ctx: StageContext,
    tokenizer: PreTrainedTokenizerBase,
    train: list,
    val: list,
    max_length: int,
    new_tokens: int,
    judged: list,
) -> Aligned:
    """SteerLM: attribute model (saved as `attribute_model/`), attribute-conditioned SFT, steering measured."""
    cfg: AlignConfig = ctx.config
    sft_path = ctx.input_path("sft", "hf")
    train_items = steerlm.labelled_answers(train)
    edges = steerlm.verbosity_edges([item["answer"] for item in train_items])
    train_items = steerlm.with_verbosity(train_items, edges)
    val_items = steerlm.with_verbosity(steerlm.labelled_answers(val), edges)
    started = time.time()
    attribute_model = load_scoring_model(sft_path, num_labels=len(steerlm.ATTRIBUTES))
    attribute_losses = steerlm.train_attribute_model(
        attribute_model, tokenizer, train_items, max_length,
        LoopSettings(cfg.attribute_steps, cfg.batch_size, cfg.rm_learning_rate, ctx.seed,
                     phase_checkpoints(ctx, "attribute_model")),
    )
    val_predicted = steerlm.predict_attributes(attribute_model, tokenizer, val_items, max_length, cfg.batch_size)
    if cfg.steer_labels == "model":
        labels = steerlm.predict_attributes(attribute_model, tokenizer, train_items, max_length, cfg.batch_size)
    else:
        labels = [{a: item[a] for a in steerlm.ATTRIBUTES} for item in train_items]
    save_hf(ctx, attribute_model, tokenizer, "attribute_model")
    del attribute_model

    policy, reference = policy_and_reference(sft_path, cfg)
    examples = steerlm.conditioned_examples(tokenizer, train_items, labels, max_length)
    losses = steerlm.train_conditioned(
        policy, examples, tokenizer.pad_token_id,
        LoopSettings(cfg.steer_steps, cfg.batch_size, cfg.steer_learning_rate, ctx.seed,
                     phase_checkpoints(ctx, "steerlm_sft")),
    )
    if not ctx.is_main:  # rank 0 measures the steering, judges and saves
        return Aligned(policy, reference, {})
    log = phase_log("attribute_model", attribute_losses) + phase_log("steerlm_sft", losses)
    words = steerlm.steered_word_counts(policy, tokenizer, judged, cfg.steer_helpfulness, new_tokens)
    accuracy = steerlm.attribute_accuracy(val_predicted, val_items)
    metrics = {
        "steer_labels": cfg.steer_labels,
        "steer_examples": len(examples),
        "verbosity_edges_words": edges,
        **{f"attribute_val_{k}": round(v, 4) for k, v in accuracy.items()},
        "steps": len(losses),
        "steer_train_loss_end": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "steer_words_by_verbosity": [round(w, 2) for w in words],
        "steer_verbosity_effect_words": round(words[-1] - words[0], 2),  # verbosity 4 minus verbosity 0
        "train_time_s": round(time.time() - started, 2),
    }
    judged_prompt = {"helpfulness": cfg.steer_helpfulness, "verbosity": cfg.steer_verbosity}
    return Aligned(policy, reference, metrics, {"attribute_model": "attribute_model"}, judged_prompt, log)


def run(ctx: StageContext) -> StageResult:
    """Train the reward model, align the SFT model by align.method, judge it, save hf/ (and the models it made)."""
    cfg: AlignConfig = ctx.config
    check_config(cfg)
    started = time.time()
    phases = ctx.out_dir / "checkpoints"
    resumed = sorted(p.name for p in phases.iterdir() if latest_step(p)) if phases.is_dir() else []
    torch.manual_seed(ctx.seed)
    sft_path = ctx.input_path("sft", "hf")
    tokenizer = AutoTokenizer.from_pretrained(str(sft_path), local_files_only=True)
    max_length = min(cfg.max_length, AutoConfig.from_pretrained(str(sft_path)).max_position_embeddings)
    new_tokens = min(cfg.max_new_tokens, max_length - int(hf_lm.MAX_PROMPT_SHARE * max_length))
    train, val, counts = load_pairs(ctx, tokenizer, max_length)
    if ctx.is_main:
        write_jsonl(ctx.out_dir / "pairs.jsonl", train + val)  # exactly what is used

    reward_model, rm_metrics, rm_losses = fit_reward_model(sft_path, tokenizer, train, val, cfg, ctx.seed,
                                                phase_checkpoints(ctx, "reward_model"))
    save_hf(ctx, reward_model, tokenizer, "reward_model")

    judged = [p["prompt"] for p in val[: cfg.judge_prompts]]
    if cfg.method == "dpo":
        aligned = align_dpo(ctx, tokenizer, train, val)
    elif cfg.method in ("ppo", "grpo"):
        aligned = align_rl(ctx, tokenizer, train, reward_model, new_tokens)
    else:
        aligned = align_steerlm(ctx, tokenizer, train, val, max_length, new_tokens, judged)
    if not ctx.is_main:  # trained; rank 0 judges and writes the outputs
        return StageResult(outputs={}, metrics={})

    steer = aligned.judged_prompt
    policy_prompts = [
        prompt_ids(tokenizer, steerlm.attribute_prompt(p, steer["helpfulness"], steer["verbosity"]) if steer else p)
        for p in judged
    ]
    verdict = judge(
        aligned.policy, aligned.reference, model_reward(reward_model), policy_prompts,
        [prompt_ids(tokenizer, p) for p in judged], new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
        ctx.seed,
    )

    write_jsonl(ctx.out_dir / "train_log.jsonl", phase_log("reward_model", rm_losses) + aligned.log)
    outputs = {"hf": "hf", "pairs": "pairs.jsonl", "reward_model": "reward_model", "train_log": "train_log.jsonl",
               **aligned.outputs}
    policy = aligned.policy
    if hasattr(policy, "merge_and_unload"):  # a LoRA policy: keep the adapter, save the merged model
        policy.save_pretrained(ctx.out_dir / "adapter")
        outputs["adapter"] = "adapter"
        policy = policy.merge_and_unload()
    policy.save_pretrained(ctx.out_dir / "hf")
    tokenizer.save_pretrained(ctx.out_dir / "hf")
    shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)  # the saved models hold the result

    metrics = {
        "method": cfg.method,
        "lora": cfg.lora,
        "data_parallel": DataParallel.current().world_size,
        "resumed_phases": resumed,
        **counts,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "max_length": max_length,
        "max_new_tokens": new_tokens,
        **rm_metrics,
        **aligned.metrics,
        "judge_prompts": len(judged),
        **{k: round(v, 4) for k, v in verdict.items()},
        "wall_time_s": round(time.time() - started, 2),
    }
    print_summary(metrics)
    return StageResult(outputs=outputs, metrics=metrics)


def print_summary(metrics: dict) -> None:
    """Print the reward model, the method's own figures and the judge's verdict as a rich table."""
    table = Table(
        title=f"align ({metrics['method']}{', LoRA' if metrics['lora'] else ''}): "
        f"{metrics['train_pairs']} pairs, {metrics['val_pairs']} held out, {metrics['judge_prompts']} judged prompts"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = ["rm_val_accuracy_before", "rm_val_accuracy", "rm_val_margin", "steps"]
    rows += [f"val_{k.replace('/', '_')}_after" for k in REWARD_KEYS]  # dpo
    rows += [k for k in metrics if k.startswith(("rl_", "attribute_val_", "steer_")) and k != "rl_reward_source"]
    rows += ["judge_score_sft", "judge_score_aligned", "win_rate_vs_sft", "kl_from_reference"]
    rows += ["response_tokens_sft", "response_tokens_aligned", "train_time_s", "wall_time_s"]
    for key in rows:
        if key in metrics:
            table.add_row(key, str(metrics[key]))
    Console().print(table)
