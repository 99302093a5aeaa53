"""The `pretrain` stage: train a Llama-shaped megatron-core GPTModel on the tokenized corpus.

Reads the tokenize stage's tokenizer and Megatron indexed datasets (or a
weighted blend of indexed datasets), trains with AdamW, linear warmup then
cosine decay, gradient clipping and gradient accumulation, evaluates every
`eval_every` steps and at the end, then exports an HF Llama checkpoint and
checks that `transformers` computes the same logits as the Megatron model.

Where it trains is decided once, in `run`: without CUDA, the plain loop of this
module in one process, fp32, checkpointing every `checkpoint_every` steps (a
re-run after a kill resumes from the last one and ends where an uninterrupted
run ends, bit for bit). With CUDA, `recipes.pretrain_gpu`: megatron-core DDP,
its distributed optimizer and pipeline schedules, bf16 autocast, under torchrun
or as one process. Writes, under the stage directory:

    checkpoint/        the final training checkpoint (see recipes.pretrain_checkpoint)
    hf/                config.json + model.safetensors + tokenizer (LlamaForCausalLM)
    loss_curve.png     train and validation loss against step
    tensorboard/       train loss, LR, grad norm, tokens/s; validation loss and perplexity
    dataset_cache/     megatron dataset index caches
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from pathlib import Path

# megatron-core announces each torch fallback it takes where Apex/Transformer Engine
# are absent (always, on CPU) and warns about a config default it deprecated itself.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed", category=UserWarning)
warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)

import torch  # noqa: E402  (after the filters: megatron warns at import time)
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline.stage import StageContext, StageResult
from recipes.hf_export import export_llama
from recipes.megatron_model import build_gpt_model, init_model_parallel
from recipes.models import ModelRecipe, get_model_recipe
from recipes.plots import save_loss_curve
from recipes.pretrain_checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from recipes.pretrain_data import batch, build_gpt_datasets, causal_mask, train_blend, unigram_loss
from recipes.stages import PretrainConfig

MAX_HF_LOGITS_DIFF = 1e-4


def stage_recipe(cfg: PretrainConfig) -> ModelRecipe:
    """Return the model recipe `cfg.model` with the config's architecture and parallelism overrides."""
    return get_model_recipe(
        cfg.model,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        rotary_base=cfg.rotary_base,
        parallelism={"tensor": cfg.tensor_parallel, "pipeline": cfg.pipeline_parallel, "context": cfg.context_parallel},
    )


def autocast(device: torch.device | str, bf16: bool) -> contextlib.AbstractContextManager:
    """Return bf16 autocast on a CUDA device that supports bf16 (when `bf16`), else a no-op (fp32).

    Never on CPU: these CPUs run bf16 matmuls at 0.3 GFLOP/s.
    """
    if bf16 and torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tensorboard_writer(log_dir: Path, purge_step: int):
    """Return a TensorBoard SummaryWriter on `log_dir` that drops events from `purge_step` on (a resumed run's)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step or None)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Return the learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """Return fused AdamW with weight decay on matrices (embeddings included) and none on norm weights.

    Fused: one kernel over all tensors, 3x faster than the default per-tensor
    loop on one CPU thread (measured by benchmarks/pretrain_throughput.py).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=True,
    )


def lm_loss(
    model: torch.nn.Module, data: dict[str, torch.Tensor], mask: torch.Tensor, num_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Return the summed next-token cross-entropy of a batch over its loss mask, over `num_tokens` (a scalar).

    `num_tokens` defaults to the batch's loss-mask count (the batch mean); with
    gradient accumulation it is the count of the whole optimizer step.
    """
    per_token = model(data["tokens"], None, mask, labels=data["labels"])  # [b, s]
    return (per_token * data["loss_mask"]).sum() / (data["loss_mask"].sum() if num_tokens is None else num_tokens)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    mask: torch.Tensor,
    grad_clip: float,
    bf16: bool = False,
) -> tuple[float, float]:
    """Run one optimizer step accumulating gradients over `micro_batches`; return (loss, grad norm).

    The loss is the mean over every loss-masked token of the step, whatever the
    split into micro-batches; the grad norm is the one before clipping.
    """
    num_tokens = sum(b["loss_mask"].sum() for b in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for data in micro_batches:
        with autocast(mask.device, bf16):
            micro_loss = lm_loss(model, data, mask, num_tokens)
        micro_loss.backward()
        loss += micro_loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss, float(grad_norm)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], mask: torch.Tensor) -> float:
    """Return the token-weighted mean loss of `model` over `batches`."""
    model.eval()
    total, count = 0.0, 0.0
    for data in batches:
        per_token = model(data["tokens"], None, mask, labels=data["labels"])  # [b, s]
        total += float((per_token * data["loss_mask"]).sum())
        count += float(data["loss_mask"].sum())
    model.train()
    return total / count


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_ds,
    valid_batches: list[dict[str, torch.Tensor]],
    cfg: PretrainConfig,
    seq_length: int,
    checkpoint_dir: Path,
    tensorboard_dir: Path | None = None,
) -> dict:
    """Run (or resume) the plain training loop to `cfg.max_steps`; return the training state.

    Optimizer step s reads training samples [s·m·a, (s+1)·m·a) (m = micro-batch
    size, a = accumulation steps), so resuming needs no data-loader state. The
    state holds "step", "train" ([step, loss] pairs), "val" ([step, loss]
    pairs), "train_seconds" (time in training steps, summed over resumed runs)
    and "resumed_from" (the step this call started at). With `tensorboard_dir`,
    scalars are written there.
    """
    state = {"step": 0, "train": [], "val": [], "train_seconds": 0.0, "resumed_from": 0}
    found = find_checkpoint(checkpoint_dir)
    if found:
        state = load_checkpoint(found, model, optimizer)
        state["resumed_from"] = state["step"]
    device = next(model.parameters()).device
    mask = causal_mask(seq_length, device)
    mbs, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    writer = tensorboard_writer(tensorboard_dir, state["step"]) if tensorboard_dir else None
    model.train()
    bar = tqdm(range(state["step"], cfg.max_steps), initial=state["step"], total=cfg.max_steps, desc="pretrain")
    for step in bar:
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = step * mbs * accum
        micro_batches = [batch(train_ds, range(first + i * mbs, first + (i + 1) * mbs), device) for i in range(accum)]
        loss, grad_norm = train_step(model, optimizer, micro_batches, mask, cfg.grad_clip, cfg.bf16)
        state["train_seconds"] += time.perf_counter() - started
        state["step"] = step + 1
        state["train"].append([step + 1, round(loss, 5)])
        tokens_per_s = state["step"] * mbs * accum * seq_length / state["train_seconds"]
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}")
        if writer:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("tokens_per_s", tokens_per_s)):
                writer.add_scalar(f"train/{name}", value, state["step"])
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            val = evaluate(model, valid_batches, mask)
            state["val"].append([state["step"], round(val, 5)])
            bar.write(f"step {state['step']}: val loss {val:.4f}, ppl {math.exp(val):.1f}")
            if writer:
                writer.add_scalar("val/loss", val, state["step"])
                writer.add_scalar("val/ppl", math.exp(val), state["step"])
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.max_steps:
            if writer:
                writer.flush()
            save_checkpoint(checkpoint_dir, model, optimizer, state)
    bar.close()
    if writer:
        writer.close()
    return state


@torch.no_grad()
def hf_logits_max_abs_diff(model: torch.nn.Module, hf_dir: Path, tokens: torch.Tensor, vocab_size: int) -> float:
    """Return max |logits| difference between the Megatron model and the HF Llama loaded from `hf_dir`.

    Both run in fp32; the HF model runs on the CPU.
    """
    model.eval()
    seq = tokens.shape[1]
    mcore_logits = model(tokens, None, causal_mask(seq, tokens.device))[..., :vocab_size].cpu()  # [b, s, V]
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    hf_logits = hf_model(input_ids=tokens.cpu()).logits  # [b, s, V]
    return float((mcore_logits - hf_logits).abs().max())


def print_summary(metrics: dict) -> None:
    """Print the stage's key figures as a rich table."""
    table = Table(title="pretrain")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, int):
            text = f"{value:,}"
        elif abs(value) >= 100:
            text = f"{value:,.1f}"
        else:
            text = f"{value:.4g}"
        table.add_row(key, text)
    Console().print(table)


def validation_batches(valid_ds, cfg: PretrainConfig, device, full_only: bool) -> list[dict[str, torch.Tensor]]:
    """Return up to `cfg.eval_batches` validation micro-batches on `device` (`full_only`: drop a short last one)."""
    mbs = cfg.micro_batch_size
    n_valid = min(len(valid_ds), cfg.eval_batches * mbs)
    if full_only:
        n_valid -= n_valid % mbs
    if n_valid == 0:
        raise ValueError(f"the validation set has too few samples of {cfg.seq_length or 'the recipe'}'s length")
    return [batch(valid_ds, range(i, min(i + mbs, n_valid)), device) for i in range(0, n_valid, mbs)]


def run(ctx: StageContext) -> StageResult:
    """Train (plain loop on CPU, megatron-core's parallel machinery on GPUs), export to HF Llama, verify it.

    Returns the output roles and metrics. Under torchrun only global rank 0
    writes outputs; the other ranks return none.
    """
    cfg: PretrainConfig = ctx.config
    counts = ("max_steps", "eval_every", "checkpoint_every", "micro_batch_size", "grad_accum_steps", "eval_batches")
    if min(getattr(cfg, name) for name in counts) < 1:
        raise ValueError(f"pretrain: {', '.join(counts)} must be >= 1")
    torch.set_num_threads(ctx.threads)
    recipe = stage_recipe(cfg)
    seq_length = cfg.seq_length or recipe.seq_length
    tokenizer_dir = ctx.input_path("tokenize", "tokenizer")
    data_dir = ctx.input_path("tokenize", "data")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    vocab_size = len(tokenizer)
    blend = train_blend(data_dir, cfg.data_prefixes, cfg.data_weights)
    tensorboard_dir = ctx.out_dir / "tensorboard" if cfg.tensorboard else None

    gpu = torch.cuda.is_available()
    if gpu:  # megatron-core DDP, distributed optimizer, pipeline schedules
        from recipes import pretrain_gpu

        pretrain_gpu.check_exportable(recipe.parallelism)
        world = pretrain_gpu.init_parallel(recipe.parallelism, ctx.seed)
        samples_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world.data_parallel_size
    else:
        init_model_parallel(ctx.seed)  # a one-process world: megatron's datasets ask torch.distributed for ranks
        samples_per_step = cfg.micro_batch_size * cfg.grad_accum_steps
    cache_dir = ctx.out_dir / "dataset_cache"
    train_samples = cfg.max_steps * samples_per_step
    train_ds, valid_ds = build_gpt_datasets(
        data_dir, tokenizer_dir, seq_length, train_samples, ctx.seed, cache_dir, blend
    )
    valid_batches = validation_batches(valid_ds, cfg, "cuda" if gpu else "cpu", full_only=gpu)
    if gpu:
        chunks = pretrain_gpu.build_model_chunks(recipe, vocab_size, ctx.seed, seq_length)
        optimizer = pretrain_gpu.make_optimizer(chunks, cfg)
        state = pretrain_gpu.train_parallel(
            chunks, optimizer, train_ds, valid_batches, cfg, seq_length, world, lr_at, tensorboard_dir
        )
        if not world.is_main:
            return StageResult(outputs={}, metrics={})
        model = chunks[0].module  # TP = PP = 1 (check_exportable): the whole model
        save_checkpoint(ctx.out_dir / "checkpoint", model, None, state)
    else:  # the plain loop
        model = build_gpt_model(recipe, vocab_size, ctx.seed, seq_length)
        optimizer = make_optimizer(model, cfg)
        checkpoint_dir = ctx.out_dir / "checkpoint"
        state = train(model, optimizer, train_ds, valid_batches, cfg, seq_length, checkpoint_dir, tensorboard_dir)

    val_loss = state["val"][-1][1]
    labels = torch.cat([b["labels"] for b in valid_batches])
    loss_mask = torch.cat([b["loss_mask"] for b in valid_batches])
    unigram = unigram_loss(data_dir, vocab_size, labels, loss_mask)
    save_loss_curve(ctx.out_dir / "loss_curve.png", state["train"], state["val"], "validation",
                    "loss (nats/token)", baseline=(unigram, "unigram baseline"))

    shutil.rmtree(ctx.out_dir / "hf", ignore_errors=True)  # a half-written export of a killed run
    hf_dir = export_llama(model, recipe, tokenizer_dir, seq_length, ctx.out_dir / "hf")
    diff = hf_logits_max_abs_diff(model, hf_dir, valid_batches[0]["tokens"], vocab_size)
    if diff > MAX_HF_LOGITS_DIFF:
        raise RuntimeError(f"HF export differs from the Megatron model: max |logits diff| {diff:.3g} > {MAX_HF_LOGITS_DIFF}")

    train_tokens = state["step"] * samples_per_step * seq_length
    metrics = {
        "params": sum(p.numel() for p in model.parameters()),
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
