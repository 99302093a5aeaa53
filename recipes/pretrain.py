"""The `pretrain` stage: train a Llama-shaped megatron-core GPTModel on the tokenized corpus.

Reads the tokenize stage's tokenizer and Megatron indexed datasets, trains with
a plain loop (AdamW, linear warmup then cosine decay, gradient clipping; fp32 on
CPU), evaluates every `eval_every` steps and at the end, checkpoints every
`checkpoint_every` steps (a re-run after a kill resumes from the last one and
ends where an uninterrupted run ends), then exports an HF Llama checkpoint and
checks that `transformers` computes the same logits as the Megatron model.
Writes, under the stage directory:

    checkpoint/        the final training checkpoint (see recipes.pretrain_checkpoint)
    hf/                config.json + model.safetensors + tokenizer (LlamaForCausalLM)
    loss_curve.png     train and validation loss against step
    dataset_cache/     megatron GPTDataset index caches
"""

from __future__ import annotations

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
from recipes.megatron_model import build_gpt_model
from recipes.models import get_model_recipe
from recipes.pretrain_checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from recipes.pretrain_data import batch, build_gpt_datasets, causal_mask, unigram_loss
from recipes.stages import PretrainConfig

MAX_HF_LOGITS_DIFF = 1e-4


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Return the learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """Return AdamW with weight decay on matrices (embeddings included) and none on norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
    )


def lm_loss(model: torch.nn.Module, data: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Return the mean next-token cross-entropy of a batch over its loss mask (a scalar)."""
    per_token = model(data["tokens"], None, mask, labels=data["labels"])  # [b, s]
    return (per_token * data["loss_mask"]).sum() / data["loss_mask"].sum()


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
) -> dict:
    """Run (or resume) the training loop to `cfg.max_steps`; return the training state.

    The state holds "step", "train" ([step, loss] pairs), "val" ([step, loss]
    pairs), "train_seconds" (time in training steps, summed over resumed runs)
    and "resumed_from" (the step this call started at).
    """
    state = {"step": 0, "train": [], "val": [], "train_seconds": 0.0, "resumed_from": 0}
    found = find_checkpoint(checkpoint_dir)
    if found:
        state = load_checkpoint(found, model, optimizer)
        state["resumed_from"] = state["step"]
    device = next(model.parameters()).device
    mask = causal_mask(seq_length, device)
    mbs = cfg.micro_batch_size
    model.train()
    bar = tqdm(range(state["step"], cfg.max_steps), initial=state["step"], total=cfg.max_steps, desc="pretrain")
    for step in bar:
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        data = batch(train_ds, range(step * mbs, (step + 1) * mbs), device)
        loss = lm_loss(model, data, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        state["train_seconds"] += time.perf_counter() - started
        state["step"] = step + 1
        state["train"].append([step + 1, round(loss.item(), 5)])
        tokens_per_s = state["step"] * data["tokens"].numel() / state["train_seconds"]
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}")
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            val = evaluate(model, valid_batches, mask)
            state["val"].append([state["step"], round(val, 5)])
            bar.write(f"step {state['step']}: val loss {val:.4f}, ppl {math.exp(val):.1f}")
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.max_steps:
            save_checkpoint(checkpoint_dir, model, optimizer, state)
    bar.close()
    return state


def plot_loss_curve(state: dict, unigram: float, path: Path) -> Path:
    """Draw train/validation loss against step (and the unigram baseline) to a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*state["train"]), label="train", linewidth=1)
    if state["val"]:
        ax.plot(*zip(*state["val"]), "o-", label="validation")
    ax.axhline(unigram, color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def run(ctx: StageContext) -> StageResult:
    """Train, checkpoint, export to HF Llama and verify the export; return outputs and metrics."""
    cfg: PretrainConfig = ctx.config
    if min(cfg.max_steps, cfg.eval_every, cfg.checkpoint_every, cfg.micro_batch_size, cfg.eval_batches) < 1:
        raise ValueError("pretrain: max_steps, eval_every, checkpoint_every, micro_batch_size, eval_batches must be >= 1")
    torch.set_num_threads(ctx.threads)
    recipe = get_model_recipe(cfg.model)
    seq_length = cfg.seq_length or recipe.seq_length
    tokenizer_dir = ctx.input_path("tokenize", "tokenizer")
    data_dir = ctx.input_path("tokenize", "data")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    vocab_size = len(tokenizer)

    model = build_gpt_model(recipe, vocab_size, ctx.seed, seq_length)
    device = next(model.parameters()).device
    train_ds, valid_ds = build_gpt_datasets(
        data_dir, tokenizer_dir, seq_length, cfg.max_steps * cfg.micro_batch_size, ctx.seed, ctx.out_dir / "dataset_cache"
    )
    n_valid = min(len(valid_ds), cfg.eval_batches * cfg.micro_batch_size)
    if n_valid == 0:
        raise ValueError(f"the validation set has no sample of {seq_length} tokens; lower pretrain.seq_length")
    mbs = cfg.micro_batch_size
    valid_batches = [batch(valid_ds, range(i, min(i + mbs, n_valid)), device) for i in range(0, n_valid, mbs)]

    optimizer = make_optimizer(model, cfg)
    state = train(model, optimizer, train_ds, valid_batches, cfg, seq_length, ctx.out_dir / "checkpoint")

    val_loss = state["val"][-1][1]
    labels = torch.cat([b["labels"] for b in valid_batches])
    loss_mask = torch.cat([b["loss_mask"] for b in valid_batches])
    unigram = unigram_loss(data_dir, vocab_size, labels, loss_mask)
    plot_loss_curve(state, unigram, ctx.out_dir / "loss_curve.png")

    shutil.rmtree(ctx.out_dir / "hf", ignore_errors=True)  # a half-written export of a killed run
    hf_dir = export_llama(model, recipe, tokenizer_dir, seq_length, ctx.out_dir / "hf")
    diff = hf_logits_max_abs_diff(model, hf_dir, valid_batches[0]["tokens"], vocab_size)
    if diff > MAX_HF_LOGITS_DIFF:
        raise RuntimeError(f"HF export differs from the Megatron model: max |logits diff| {diff:.3g} > {MAX_HF_LOGITS_DIFF}")

    metrics = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": state["step"],
        "resumed_from_step": state["resumed_from"],
        "train_tokens": state["step"] * cfg.micro_batch_size * seq_length,
        "train_loss": state["train"][-1][1],
        "val_loss": round(val_loss, 4),
        "val_ppl": round(math.exp(val_loss), 2),
        "unigram_val_loss": round(unigram, 4),
        "tokens_per_s": round(state["step"] * cfg.micro_batch_size * seq_length / state["train_seconds"], 1),
        "hf_logits_max_abs_diff": float(f"{diff:.3g}"),
    }
    print_summary(metrics)
    return StageResult(
        outputs={"checkpoint": "checkpoint", "hf": "hf", "loss_curve": "loss_curve.png"},
        metrics=metrics,
    )
