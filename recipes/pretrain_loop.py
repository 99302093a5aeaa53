"""The pretraining loop, on megatron-core's own parallel machinery: one loop for CPUs and GPUs.

Around the GPTModel of `recipes.megatron_model`, megatron-core does what
Megatron-LM and NeMo do at scale, on any layout TP x PP x DP (CP with
Transformer Engine), with gloo on CPUs (through `recipes.cpu_shims`) and NCCL
on GPUs; the device and the backend are the only difference:

- each rank builds its pipeline stage (its virtual stages when interleaved),
  each wrapped in megatron's `DistributedDataParallel` (contiguous fp32 grad
  buffers, reduced over the data-parallel ranks by `finalize_model_grads`);
- megatron's optimizer (AdamW, gradient clipping by the global norm over every
  rank inside `optimizer.step()`). Not its distributed optimizer: it asserts
  CUDA tensor types, and its state lives in flat DP-sharded buffers that the
  reshardable checkpoints of `recipes.dist_checkpoint` do not map;
- `get_forward_backward_func()`: the schedule for the pipeline size (no
  pipelining, 1F1B, or interleaved 1F1B) runs the micro-batches of a step
  (gradient accumulation), under bf16 autocast on GPUs when asked.

The losses are per token (`calculate_per_token_loss`): each step's loss and
gradient are the mean over every token of the global batch, whatever the layout.
DP rank r reads micro-batch i of a step from samples c + (i·D + r)·m onward
(c samples consumed before the step, m micro-batch size, D the DP size): a step
is one global batch of the same deterministic sample order, so a run on any
layout sees the same data, and resuming needs only the consumed-sample count.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_batch_on_this_cp_rank
from tqdm import tqdm

from recipes import dist_checkpoint
from recipes.megatron_model import World, build_gpt_model, virtual_stages
from recipes.models import ModelRecipe
from recipes.pretrain_data import batch
from recipes.stages import PretrainConfig


def build_model_chunks(
    recipe: ModelRecipe, vocab_size: int, seed: int, seq_length: int, bf16: bool = False
) -> list[DistributedDataParallel]:
    """Return this rank's model chunks (one per virtual pipeline stage), each wrapped in megatron DDP.

    Also installs on the model config the hook megatron's schedules call after
    the backward passes (`finalize_model_grads`: the DP all-reduce of the grad
    buffers, the embedding/output all-reduce of tied weights, the division by
    the step's token count).
    """
    vpp = virtual_stages(recipe.parallelism)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    chunks = []
    for stage in range(vpp):
        model = build_gpt_model(recipe, vocab_size, seed, seq_length, vp_stage=stage if vpp > 1 else None, bf16=bf16)
        chunks.append(DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model))
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    return chunks


def make_optimizer(chunks: list[DistributedDataParallel], cfg: PretrainConfig):
    """Return megatron's AdamW over `chunks` (no weight decay on norms), clipping at cfg.grad_clip."""
    config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=1e-8,
        clip_grad=cfg.grad_clip,
        params_dtype=torch.float32,
        use_distributed_optimizer=False,
    )
    return get_megatron_optimizer(config, chunks)


def forward_step(data_iterator, model):
    """Run one micro-batch forward; return (output, loss function), as megatron's schedules expect.

    The loss function returns (summed token loss, token count, {"lm loss": [sum, count]}):
    with per-token losses the schedule sums both over the micro-batches.
    """
    data = next(data_iterator)
    if parallel_state.get_context_parallel_world_size() > 1:
        data = get_batch_on_this_cp_rank(data)
    output = model(data["tokens"], None, None, labels=data["labels"])  # last stage: [b, s] token losses

    def loss_func(per_token: torch.Tensor):
        mask = data["loss_mask"]
        loss_sum = (per_token.float() * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return output, loss_func


def _schedule(chunks, step_func, micro_batches: list[dict], seq_length: int, forward_only: bool) -> list[dict]:
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def _from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """Broadcast `tensor` along the pipeline from its last stage (where the outputs are) to every stage."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            tensor,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return tensor


def run_schedule(
    chunks: list[DistributedDataParallel], micro_batches: list[dict], seq_length: int, forward_only: bool
) -> float:
    """Run megatron's forward(/backward) schedule over `micro_batches`; return their token-mean loss on every rank.

    The loss lives on the last pipeline stage; it is summed over the
    data-parallel ranks there and broadcast along the pipeline.
    """
    losses = _schedule(chunks, forward_step, micro_batches, seq_length, forward_only)
    device = micro_batches[0]["tokens"].device
    total = torch.zeros(2, device=device)  # [loss sum, token count]
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        total = torch.stack([d["lm loss"] for d in losses]).sum(0)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    _from_last_stage(total)
    return float(total[0] / total[1])


@torch.no_grad()
def full_logits(chunks: list[DistributedDataParallel], micro_batches: list[dict], padded_vocab: int) -> torch.Tensor:
    """Return the model's logits [b, s, padded vocab] of the first of `micro_batches` on every rank.

    TP shards are gathered; all the micro-batches run (the interleaved schedule
    needs at least as many as pipeline stages).
    """
    captured = []

    def logits_step(data_iterator, model):
        data = next(data_iterator)
        output = model(data["tokens"], None, None)  # last stage: [b, s, vocab / TP]

        def keep(logits: torch.Tensor):
            captured.append(gather_from_tensor_model_parallel_region(logits.float()))
            return torch.zeros((), device=logits.device), torch.ones((), dtype=torch.int), {}

        return output, keep

    for chunk in chunks:
        chunk.eval()
    tokens = micro_batches[0]["tokens"]
    _schedule(chunks, logits_step, micro_batches, tokens.shape[1], forward_only=True)
    for chunk in chunks:
        chunk.train()
    logits = captured[0] if captured else torch.zeros(*tokens.shape, padded_vocab, device=tokens.device)
    return _from_last_stage(logits.contiguous())


def train_step(chunks, optimizer, micro_batches: list[dict], seq_length: int, lr: float) -> tuple[float, float]:
    """Run one optimizer step over this rank's `micro_batches`; return (loss, grad norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_schedule(chunks, micro_batches, seq_length, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    return loss, float(grad_norm or 0.0)


def rank_micro_batches(dataset, consumed: int, cfg: PretrainConfig, world: World) -> list[dict]:
    """Return DP rank `world.data_parallel_rank`'s micro-batches of the step after `consumed` samples."""
    mbs, dp = cfg.micro_batch_size, world.data_parallel_size
    starts = [consumed + (i * dp + world.data_parallel_rank) * mbs for i in range(cfg.grad_accum_steps)]
    return [batch(dataset, range(s, s + mbs), world.device) for s in starts]


def new_state(layout: dict) -> dict:
    """Return the training state of a run that has not started."""
    return {"step": 0, "consumed_samples": 0, "train": [], "grad_norm": [], "val": [], "train_seconds": 0.0,
            "resumed_from": 0, "layout": layout}


def train(
    chunks: list[DistributedDataParallel],
    optimizer,
    train_ds,
    valid_batches: list[dict],
    cfg: PretrainConfig,
    seq_length: int,
    world: World,
    lr_at: Callable[[int, PretrainConfig], float],
    checkpoint_root: Path,
    layout: dict,
    tensorboard_dir: Path | None = None,
) -> dict:
    """Train (or resume from the newest checkpoint under `checkpoint_root`) to `cfg.max_steps`; return the state.

    The state holds "step", "consumed_samples", "train" ([step, loss]),
    "grad_norm" ([step, norm before clipping]), "val" ([step, loss]), "train_seconds" (summed over resumed runs) and
    "resumed_from" (the step this call started at). Checkpoints every
    `cfg.checkpoint_every` steps and at the end, keeping the newest
    `cfg.keep_checkpoints`. Rank 0 shows the progress bar and writes TensorBoard scalars.
    """
    state = new_state(layout)
    found = dist_checkpoint.latest(checkpoint_root)
    if found:
        state = dist_checkpoint.load(found, [c.module for c in chunks], optimizer)
        state["resumed_from"] = state["step"]
        state["layout"] = layout
        state.setdefault("grad_norm", [])
    global_samples = cfg.micro_batch_size * cfg.grad_accum_steps * world.data_parallel_size
    writer = None
    if world.is_main and tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir), purge_step=state["step"] or None)
    for chunk in chunks:
        chunk.train()
    bar = tqdm(range(state["step"], cfg.max_steps), initial=state["step"], total=cfg.max_steps, desc="pretrain",
               disable=not world.is_main)
    for step in bar:
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        micro_batches = rank_micro_batches(train_ds, state["consumed_samples"], cfg, world)
        loss, grad_norm = train_step(chunks, optimizer, micro_batches, seq_length, lr)
        state["train_seconds"] += time.perf_counter() - started  # the loss broadcast synchronised the device
        state["step"] = step + 1
        state["consumed_samples"] += global_samples
        state["train"].append([step + 1, round(loss, 6)])
        state["grad_norm"].append([step + 1, round(grad_norm, 6)])
        tokens_per_s = state["consumed_samples"] * seq_length / state["train_seconds"]
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}")
        if writer:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("tokens_per_s", tokens_per_s)):
                writer.add_scalar(f"train/{name}", value, state["step"])
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            for chunk in chunks:
                chunk.eval()
            with torch.no_grad():
                val = run_schedule(chunks, valid_batches, seq_length, forward_only=True)
            for chunk in chunks:
                chunk.train()
            state["val"].append([state["step"], round(val, 6)])
            if world.is_main:
                bar.write(f"step {state['step']}: val loss {val:.4f}, ppl {math.exp(val):.1f}")
            if writer:
                writer.add_scalar("val/loss", val, state["step"])
                writer.add_scalar("val/ppl", math.exp(val), state["step"])
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.max_steps:
            if writer:
                writer.flush()
            dist_checkpoint.save(checkpoint_root, [c.module for c in chunks], optimizer, state, cfg.keep_checkpoints)
    bar.close()
    if writer:
        writer.close()
    return state
