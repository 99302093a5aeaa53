"""Pretraining on GPUs with megatron-core's own machinery: the path `recipes.pretrain` takes when CUDA is present.

The model is the same GPTModel as on CPU; around it, megatron-core does what
Megatron-LM and NeMo do at scale:

- parallel state from the torchrun world (or a one-process world without
  torchrun): TP x PP x CP from the recipe's `Parallelism`, DP = the rest;
- each rank builds its pipeline stage (its virtual stages when interleaved),
  wrapped in megatron's `DistributedDataParallel` (contiguous fp32 grad buffers);
- megatron's distributed optimizer (AdamW, optimizer state sharded over DP;
  gradient clipping inside `optimizer.step()`);
- `get_forward_backward_func()`: the schedule for the pipeline size (no
  pipelining, 1F1B, or interleaved 1F1B) runs the micro-batches of a step
  (gradient accumulation) under bf16 autocast (the weights stay fp32).

DP rank r reads micro-batch i of step s from samples
(s·a·D + i·D + r)·m onward (m micro-batch size, a accumulation steps, D the
DP size): a step is one global batch of the same deterministic sample order.
What is not written here: periodic checkpoints and resume (megatron's
distributed checkpointing writes pickled metadata, which this project does not
load), and the HF export of a model sharded over TP or PP (gathering the
shards; Megatron-Bridge does it): `check_exportable` refuses such a run before
it trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank
from tqdm import tqdm

from recipes.megatron_model import build_gpt_model
from recipes.models import ModelRecipe, Parallelism
from recipes.pretrain_data import batch
from recipes.stages import PretrainConfig


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the torchrun world."""

    rank: int
    size: int
    data_parallel_rank: int
    data_parallel_size: int

    @property
    def is_main(self) -> bool:
        """Return True on global rank 0, the rank that logs and writes outputs."""
        return self.rank == 0


def virtual_stages(par: Parallelism) -> int:
    """Return the number of model chunks per rank: the virtual pipeline size when the pipeline is split."""
    return par.virtual_pipeline if par.pipeline > 1 else 1


def init_parallel(par: Parallelism, seed: int) -> World:
    """Set up torch.distributed (NCCL) and megatron's parallel state for `par`; return this rank's World.

    Under torchrun the world comes from its environment; otherwise it is this
    one process. The world size must be a multiple of TP x PP x CP.
    """
    if not torch.distributed.is_initialized():
        if "WORLD_SIZE" in os.environ:  # torchrun
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group("nccl")
        else:
            torch.cuda.set_device(0)
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
    size = torch.distributed.get_world_size()
    model_parallel = par.tensor * par.pipeline * par.context
    if size % model_parallel:
        raise ValueError(
            f"{size} GPU process(es) cannot hold TP {par.tensor} x PP {par.pipeline} x CP {par.context}: launch "
            f"torchrun with a multiple of {model_parallel} processes, or lower pretrain.tensor_parallel, "
            "pretrain.pipeline_parallel, pretrain.context_parallel"
        )
    if par.context > 1 and not has_transformer_engine():
        raise ValueError("context parallelism needs Transformer Engine's attention; set pretrain.context_parallel=1")
    if not parallel_state.model_parallel_is_initialized():
        vpp = virtual_stages(par)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor,
            pipeline_model_parallel_size=par.pipeline,
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            context_parallel_size=par.context,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return World(
        rank=torch.distributed.get_rank(),
        size=size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def has_transformer_engine() -> bool:
    """Return True when Transformer Engine imports."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def check_exportable(par: Parallelism) -> None:
    """Raise NotImplementedError when the trained model could not be exported (weights sharded over TP or PP)."""
    if par.tensor > 1 or par.pipeline > 1:
        raise NotImplementedError(
            f"HF export of a model sharded over TP {par.tensor} / PP {par.pipeline} is not written (it needs the "
            "shards gathered, as Megatron-Bridge does); train with pretrain.tensor_parallel=1 pipeline_parallel=1"
        )


def build_model_chunks(
    recipe: ModelRecipe, vocab_size: int, seed: int, seq_length: int
) -> list[DistributedDataParallel]:
    """Return this rank's model chunks (one per virtual pipeline stage), each wrapped in megatron DDP.

    Also installs on the model config the hooks megatron's schedules call
    (`finalize_model_grads`: the DP reduce-scatter of the grad buffers).
    """
    vpp = virtual_stages(recipe.parallelism)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if vpp > 1 else None
        model = build_gpt_model(recipe, vocab_size, seed, seq_length, parallel=True, vp_stage=vp_stage)
        chunks.append(DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model))
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    return chunks


def make_optimizer(chunks: list[DistributedDataParallel], cfg: PretrainConfig):
    """Return megatron's distributed AdamW over `chunks` (no weight decay on norms), clipping at cfg.grad_clip."""
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
        use_distributed_optimizer=True,
    )
    return get_megatron_optimizer(config, chunks)


def forward_step(data_iterator, model):
    """Run one micro-batch forward; return (output, loss function), as megatron's schedules expect.

    The loss function returns (summed token loss, token count, {"lm loss": [sum, count]}):
    the schedule divides by the count, so every micro-batch contributes its mean.
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


def run_schedule(
    chunks: list[DistributedDataParallel], micro_batches: list[dict], seq_length: int, forward_only: bool
) -> float:
    """Run megatron's forward(/backward) schedule over `micro_batches`; return their token-mean loss on every rank.

    The loss lives on the last pipeline stage; it is averaged over the
    data-parallel ranks there and broadcast along the pipeline.
    """
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    total = torch.zeros(2, device="cuda")  # [loss sum, token count]
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        total = torch.stack([d["lm loss"] for d in losses]).sum(0)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    torch.distributed.broadcast(
        total,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return float(total[0] / total[1])


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


def rank_micro_batches(dataset, step: int, cfg: PretrainConfig, world: World) -> list[dict]:
    """Return DP rank `world.data_parallel_rank`'s micro-batches of optimizer step `step`, on this GPU."""
    mbs, accum, dp = cfg.micro_batch_size, cfg.grad_accum_steps, world.data_parallel_size
    first = step * mbs * accum * dp
    starts = [first + (i * dp + world.data_parallel_rank) * mbs for i in range(accum)]
    return [batch(dataset, range(s, s + mbs), "cuda") for s in starts]


def train_parallel(
    chunks: list[DistributedDataParallel],
    optimizer,
    train_ds,
    valid_batches: list[dict],
    cfg: PretrainConfig,
    seq_length: int,
    world: World,
    lr_at,
    tensorboard_dir: Path | None = None,
) -> dict:
    """Train to `cfg.max_steps` from scratch; return the state `recipes.pretrain.train` returns.

    `lr_at(step, cfg)` gives each step's learning rate; validation runs every
    `cfg.eval_every` steps over `valid_batches` (every DP rank scores them all).
    Rank 0 shows the progress bar and writes TensorBoard scalars.
    """
    state = {"step": 0, "train": [], "val": [], "train_seconds": 0.0, "resumed_from": 0}
    global_tokens = cfg.micro_batch_size * cfg.grad_accum_steps * world.data_parallel_size * seq_length
    writer = None
    if world.is_main and tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir))
    for chunk in chunks:
        chunk.train()
    bar = tqdm(range(cfg.max_steps), desc="pretrain (GPU)", disable=not world.is_main)
    for step in bar:
        torch.cuda.synchronize()
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        loss, grad_norm = train_step(chunks, optimizer, rank_micro_batches(train_ds, step, cfg, world), seq_length, lr)
        state["train_seconds"] += time.perf_counter() - started  # the loss broadcast synchronised the GPU
        state["step"] = step + 1
        state["train"].append([step + 1, round(loss, 5)])
        tokens_per_s = state["step"] * global_tokens / state["train_seconds"]
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
            state["val"].append([state["step"], round(val, 5)])
            if world.is_main:
                bar.write(f"step {state['step']}: val loss {val:.4f}, ppl {math.exp(val):.1f}")
            if writer:
                writer.add_scalar("val/loss", val, state["step"])
                writer.add_scalar("val/ppl", math.exp(val), state["step"])
    bar.close()
    if writer:
        writer.close()
    return state
