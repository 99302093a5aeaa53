"""The `pretrain` stage: train a Llama-shaped megatron-core GPTModel on the tokenized corpus.

Reads the tokenize stage's tokenizer and Megatron indexed datasets (or a
weighted blend of indexed datasets), trains with megatron-core's parallel
machinery (`recipes.pretrain_loop`: DDP, pipeline schedules, its optimizer;
AdamW, linear warmup then cosine decay, gradient clipping and accumulation) on
any layout TP x PP x DP that the launch's ranks allow (one process by default;
`aigc pretrain --nproc-per-node N` or a Slurm job for more), evaluates every
`eval_every` steps and at the end, then exports an HF Llama checkpoint from the
final sharded checkpoint and checks that `transformers` computes the same
logits as the (parallel) Megatron model. Writes, under the stage directory:

    checkpoint/        sharded checkpoints step_<n>/ (recipes.dist_checkpoint): a re-run after a
                       kill resumes from the newest, on this layout or another
    hf/                config.json + model.safetensors + tokenizer (LlamaForCausalLM)
    loss_curve.png     train and validation loss against step
    tensorboard/       train loss, LR, grad norm, tokens/s; validation loss and perplexity
    dataset_cache/     megatron dataset index caches

Every rank runs `run`; rank 0 alone prints, exports and returns the outputs
(the runner publishes from rank 0 only).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import warnings
from pathlib import Path

# megatron-core announces each torch fallback it takes where Apex/Transformer Engine
# are absent (always, on CPU) and warns about a config default it deprecated itself.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed", category=UserWarning)
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)

import torch  # noqa: E402  (after the filters: megatron warns at import time)
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline.stage import StageContext, StageResult
from recipes import dist_checkpoint
from recipes.hf_export import export_llama
from recipes.megatron_model import init_parallel
from recipes.models import ModelRecipe
from recipes.parallel_plan import resolve_pretrain
from recipes.plots import save_loss_curve
from recipes.pretrain_data import batch, build_gpt_datasets, train_blend, unigram_loss
from recipes.pretrain_loop import build_model_chunks, full_logits, make_optimizer, train
from recipes.stages import PretrainConfig

MAX_HF_LOGITS_DIFF = 1e-4


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Return the learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def print_summary(metrics: dict) -> None:
    """Print the stage's key figures as a rich table."""
    table = Table(title="pretrain")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, str):
            text = value
        elif isinstance(value, int):
            text = f"{value:,}"
        elif abs(value) >= 100:
            text = f"{value:,.1f}"
        else:
            text = f"{value:.4g}"
        table.add_row(key, text)
    Console().print(table)


def validation_batches(valid_ds, cfg: PretrainConfig, device) -> list[dict[str, torch.Tensor]]:
    """Return up to `cfg.eval_batches` full validation micro-batches on `device` (every rank scores them all)."""
    mbs = cfg.micro_batch_size
    n_valid = min(len(valid_ds), cfg.eval_batches * mbs)
    n_valid -= n_valid % mbs
    if n_valid == 0:
        raise ValueError(f"the validation set has fewer than micro_batch_size={mbs} samples of "
                         f"{cfg.seq_length or 'the recipe'}'s length")
    return [batch(valid_ds, range(i, i + mbs), device) for i in range(0, n_valid, mbs)]


def export_from_checkpoint(checkpoint: Path, recipe: ModelRecipe, tokenizer_dir: Path, seq_length: int,
                           out_dir: Path) -> Path:
    """Write the HF Llama checkpoint of the (possibly sharded) training checkpoint `checkpoint` to `out_dir`."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a half-written export of a killed run
    return export_llama(dist_checkpoint.full_model_tensors(checkpoint), recipe, tokenizer_dir, seq_length, out_dir)


@torch.no_grad()
def hf_logits_max_abs_diff(megatron_logits: torch.Tensor, hf_dir: Path, tokens: torch.Tensor) -> float:
    """Return max |logits| difference between Megatron's logits [b, s, V(padded)] and the HF Llama in `hf_dir`."""
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    hf_logits = hf_model(input_ids=tokens.cpu()).logits  # [b, s, V]
    return float((megatron_logits[..., : hf_logits.shape[-1]].cpu() - hf_logits).abs().max())


def run(ctx: StageContext) -> StageResult:
    """Train on this launch's ranks (megatron-core's parallel machinery), export to HF Llama, verify it.

    Returns the output roles and metrics on rank 0 (the other ranks return none).
    """
    cfg: PretrainConfig = ctx.config
    counts = ("max_steps", "eval_every", "checkpoint_every", "eval_batches")
    if min(getattr(cfg, name) for name in counts) < 1:
        raise ValueError(f"pretrain: {', '.join(counts)} must be >= 1")
    torch.set_num_threads(ctx.threads)
    recipe, layout = resolve_pretrain(cfg, ctx.world_size)  # every problem of the layout, before any work
    cfg = dataclasses.replace(cfg, micro_batch_size=layout.micro_batch_size, grad_accum_steps=layout.grad_accum_steps)
    seq_length = layout.seq_length
    tokenizer_dir = ctx.input_path("tokenize", "tokenizer")
    data_dir = ctx.input_path("tokenize", "data")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    vocab_size = len(tokenizer)
    blend = train_blend(data_dir, cfg.data_prefixes, cfg.data_weights)
    tensorboard_dir = ctx.out_dir / "tensorboard" if cfg.tensorboard else None

    world = init_parallel(recipe.parallelism, ctx.seed)
    samples_per_step = layout.global_batch_size
    train_ds, valid_ds = build_gpt_datasets(data_dir, tokenizer_dir, seq_length, cfg.max_steps * samples_per_step,
                                            ctx.seed, ctx.out_dir / "dataset_cache", blend)
    valid_batches = validation_batches(valid_ds, cfg, world.device)
    if layout.virtual_pipeline > 1:  # the interleaved schedule runs micro-batches in groups of PP
        valid_batches = valid_batches[: len(valid_batches) - len(valid_batches) % layout.pipeline]
        if not valid_batches:
            raise ValueError(f"interleaved pipeline: pretrain.eval_batches must be >= {layout.pipeline} (PP) "
                             "full validation micro-batches")
    chunks = build_model_chunks(recipe, vocab_size, ctx.seed, seq_length, bf16=cfg.bf16)
    optimizer = make_optimizer(chunks, cfg)
    checkpoint_root = ctx.out_dir / "checkpoint"
    state = train(chunks, optimizer, train_ds, valid_batches, cfg, seq_length, world, lr_at, checkpoint_root,
                  dataclasses.asdict(layout), tensorboard_dir)
    padded_vocab = recipe.padded_vocab_size(vocab_size, recipe.parallelism.tensor)
    check_tokens = valid_batches[0]["tokens"]
    # the first micro-batch is compared with HF; the interleaved schedule needs PP micro-batches to run
    megatron_logits = full_logits(chunks, valid_batches[: layout.pipeline], padded_vocab)
    if not world.is_main:
        return StageResult(outputs={}, metrics={})

    val_loss = state["val"][-1][1]
    labels = torch.cat([b["labels"] for b in valid_batches])
    loss_mask = torch.cat([b["loss_mask"] for b in valid_batches])
    unigram = unigram_loss(data_dir, vocab_size, labels, loss_mask)
    save_loss_curve(ctx.out_dir / "loss_curve.png", state["train"], state["val"], "validation",
                    "loss (nats/token)", baseline=(unigram, "unigram baseline"))
    final = dist_checkpoint.latest(checkpoint_root)
    hf_dir = export_from_checkpoint(final, recipe, tokenizer_dir, seq_length, ctx.out_dir / "hf")
    diff = hf_logits_max_abs_diff(megatron_logits, hf_dir, check_tokens)
    if diff > MAX_HF_LOGITS_DIFF:
        raise RuntimeError(f"HF export differs from the Megatron model: max |logits diff| {diff:.3g} > {MAX_HF_LOGITS_DIFF}")

    train_tokens = state["consumed_samples"] * seq_length
    metrics = {
        "params": recipe.num_params(padded_vocab),
        "layout": f"TP{layout.tensor} PP{layout.pipeline} CP{layout.context} DP{layout.data}",
        "world_size": world.size,
        "global_batch_size": layout.global_batch_size,
        "steps": state["step"],
        "resumed_from_step": state["resumed_from"],
        "train_tokens": train_tokens,
        "train_loss": state["train"][-1][1],
        "val_loss": round(val_loss, 4),
        "val_ppl": round(math.exp(val_loss), 2),
        "unigram_val_loss": round(unigram, 4),
        "tokens_per_s": round(train_tokens / state["train_seconds"], 1),
        "hf_logits_max_abs_diff": float(f"{diff:.3g}"),
    }
    print_summary(metrics)
    outputs = {"checkpoint": "checkpoint", "hf": "hf", "loss_curve": "loss_curve.png"}
    if tensorboard_dir:
        outputs["tensorboard"] = "tensorboard"
    return StageResult(outputs=outputs, metrics=metrics)
