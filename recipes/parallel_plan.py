"""Plan a pretraining job before launching it: the parallel layout, the global batch, per-rank memory.

`resolve_layout` checks a recipe's parallelism against the world size and the
batch settings with the constraints megatron-core 0.16.1 asserts at run time
(each rule below cites where), and raises `LayoutError` naming every rule a
layout breaks and the setting that fixes it. `estimate_memory` counts one
rank's parameters and the bytes of its weights, gradients, Adam state and
activations, for the pipeline rank that needs the most. `layout_table` and
`describe_plan` print both. Light: no torch or megatron import, for a dry run.

The layout follows `recipes.megatron_model`: a virtual pipeline size with
PP = 1 and sequence parallelism with TP = 1 are ignored there (megatron would
refuse them), so they are ignored here too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io

from rich.console import Console
from rich.table import Table

from recipes.models import ModelRecipe, get_model_recipe

GIB = 2**30


class LayoutError(ValueError):
    """A layout megatron would refuse; `problems` holds one line per broken rule."""

    def __init__(self, header: str, problems: list[str]):
        self.problems = tuple(problems)
        super().__init__(header + "".join(f"\n  - {p}" for p in problems))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a job's ranks split the model and its batch: TP x PP x CP x DP = world size."""

    world_size: int
    tensor: int
    pipeline: int
    virtual_pipeline: int  # model chunks per pipeline rank (1 = not interleaved)
    context: int
    data: int
    sequence_parallel: bool
    micro_batch_size: int  # sequences per forward pass per data-parallel rank
    grad_accum_steps: int  # micro-batches per optimizer step per data-parallel rank
    global_batch_size: int  # sequences per optimizer step = micro * accumulation * DP
    seq_length: int

    @property
    def tokens_per_step(self) -> int:
        """Return the tokens of one optimizer step."""
        return self.global_batch_size * self.seq_length


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """One rank's training memory in bytes, for the pipeline rank that needs the most."""

    pipeline_rank: int
    params: int  # parameters held by that rank (its TP shards of its layers, embedding, output layer)
    model_params: int  # parameters of the whole model, with the padded vocabulary
    padded_vocab: int  # embedding rows: the vocabulary padded as the model pads it
    weights: int
    gradients: int
    optimizer: int
    activations: int
    in_flight: int  # micro-batches (model-chunk passes when interleaved) whose activations are held at once
    optimizer_shards: int  # ranks the Adam state is split over (DP x CP with the distributed optimizer)
    activation_bytes: int  # bytes per activation element (2 under bf16 autocast, else 4)

    @property
    def total(self) -> int:
        """Return the sum of weights, gradients, optimizer state and activations."""
        return self.weights + self.gradients + self.optimizer + self.activations


def resolve_layout(
    recipe: ModelRecipe,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    grad_accum_steps: int,
    seq_length: int,
    *,
    transformer_engine: bool | None = None,
) -> Layout:
    """Return the Layout of `recipe.parallelism` on `world_size` ranks, or raise LayoutError with every problem.

    `global_batch_size` 0 takes the recipe's, or micro * accumulation * DP for
    a recipe without one; with a global batch, the accumulation steps are
    derived from it (`grad_accum_steps` is then unused). `seq_length` 0 takes
    the recipe's. `transformer_engine` says whether the ranks have Transformer
    Engine (context parallelism needs it); None = whether this machine has it.
    """
    par = recipe.parallelism
    tp, pp, cp = par.tensor, par.pipeline, par.context
    seq = seq_length or recipe.seq_length
    header = f"{recipe.name} does not fit TP {tp} x PP {pp} x CP {cp} on {world_size} rank(s):"
    counts = {
        "--nproc-per-node (the world size)": world_size, "pretrain.tensor_parallel": tp,
        "pretrain.pipeline_parallel": pp, "pretrain.virtual_pipeline_parallel": par.virtual_pipeline,
        "pretrain.context_parallel": cp, "pretrain.micro_batch_size": micro_batch_size,
        "pretrain.grad_accum_steps": grad_accum_steps, "pretrain.seq_length": seq,
    }
    too_small = [f"{key} must be >= 1, not {value}" for key, value in counts.items() if value < 1]
    if global_batch_size < 0:
        too_small.append(f"pretrain.global_batch_size must be >= 0 (0 = the recipe's), not {global_batch_size}")
    if too_small:
        raise LayoutError(header, too_small)

    vpp = par.virtual_pipeline if pp > 1 else 1  # recipes.megatron_model.virtual_stages
    sp = par.sequence_parallel and tp > 1  # recipes.megatron_model.transformer_config
    heads, groups, ffn = recipe.num_attention_heads, recipe.num_query_groups, recipe.ffn_hidden_size
    problems = []
    model_parallel = tp * pp * cp
    # parallel_state.initialize_model_parallel: "world_size is not divisible by tp * pp * cp"
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not a multiple of TP {tp} x PP {pp} x CP {cp} = {model_parallel}: "
            f"launch a multiple of {model_parallel} ranks (--nproc-per-node), or change pretrain.tensor_parallel, "
            "pretrain.pipeline_parallel, pretrain.context_parallel"
        )
    # TransformerConfig.__post_init__: num_attention_heads % tensor_model_parallel_size
    if heads % tp:
        problems.append(f"{heads} attention heads do not split over TP {tp}: "
                        f"set pretrain.tensor_parallel to a divisor of {heads}")
    # TransformerConfig.__post_init__: num_query_groups must be a multiple or a divisor of TP
    if groups % tp and tp % groups:
        problems.append(f"{groups} query groups are neither a multiple nor a divisor of TP {tp}: "
                        "set pretrain.tensor_parallel to a divisor or multiple of "
                        f"{groups} (or pretrain.num_query_groups)")
    # tensor_parallel.ColumnParallelLinear: divide(output_size, world_size) for linear_qkv (q, k, v rows)
    qkv_rows = (heads + 2 * groups) * recipe.head_dim
    if not heads % tp and qkv_rows % tp:
        problems.append(f"linear_qkv's {qkv_rows} output rows do not split over TP {tp}: "
                        "change pretrain.tensor_parallel")
    # ColumnParallelLinear (linear_fc1) and RowParallelLinear (linear_fc2): divide(ffn_hidden_size, world_size)
    if ffn % tp:
        problems.append(f"FFN size {ffn} does not split over TP {tp}: set pretrain.tensor_parallel to a "
                        f"divisor of {ffn} (or pretrain.ffn_hidden_size)")
    # transformer_block.get_num_layers_to_build: num_layers % PP, then layers per rank % VPP
    if pp > 1 and recipe.num_layers % (pp * vpp):
        problems.append(f"{recipe.num_layers} layers do not split into PP {pp} x VPP {vpp} = {pp * vpp} equal "
                        "stages: change pretrain.pipeline_parallel, pretrain.virtual_pipeline_parallel "
                        "or pretrain.num_layers")
    # megatron_model.init_parallel: TE's attention is the one with context parallelism
    if transformer_engine is None:
        transformer_engine = importlib.util.find_spec("transformer_engine") is not None
    if cp > 1 and not transformer_engine:
        problems.append(f"CP {cp} needs Transformer Engine's attention, which is not installed: "
                        "set pretrain.context_parallel=1")
    # utils.get_batch_on_this_cp_rank: each sequence is cut into 2 * CP chunks (load-balanced causal CP)
    if cp > 1 and seq % (2 * cp):
        problems.append(f"sequence length {seq} does not cut into 2 x CP = {2 * cp} equal chunks: "
                        f"set pretrain.seq_length to a multiple of {2 * cp} or change pretrain.context_parallel")
    # tensor_parallel.mappings._split_along_first_dim: sequence parallelism splits each CP chunk over TP
    if sp and not seq % cp and (seq // cp) % tp:
        problems.append(f"sequence parallelism splits {seq // cp} tokens per CP rank over TP {tp}: "
                        f"set pretrain.seq_length to a multiple of {cp * tp} or change pretrain.tensor_parallel")

    if world_size % model_parallel:
        raise LayoutError(header, problems)
    dp = world_size // model_parallel
    per_accum_step = micro_batch_size * dp
    global_batch = global_batch_size or recipe.global_batch_size or per_accum_step * grad_accum_steps
    if global_batch % per_accum_step:
        problems.append(
            f"global batch {global_batch} is not a multiple of micro batch {micro_batch_size} x DP {dp} = "
            f"{per_accum_step}: change pretrain.micro_batch_size, pretrain.global_batch_size or the world size"
        )
    accum = global_batch // per_accum_step
    # schedules.forward_backward_pipelining_with_interleaving: micro-batches come in groups of
    # microbatch_group_size_per_vp_stage (= PP); the last group may not be partial
    if vpp > 1 and not global_batch % per_accum_step and accum % pp:
        problems.append(
            f"the interleaved schedule needs the {accum} micro-batches per step to be a multiple of PP {pp}: "
            "change pretrain.global_batch_size (or pretrain.grad_accum_steps), pretrain.micro_batch_size, "
            "or set pretrain.virtual_pipeline_parallel=1"
        )
    if problems:
        raise LayoutError(header, problems)
    return Layout(
        world_size=world_size, tensor=tp, pipeline=pp, virtual_pipeline=vpp, context=cp, data=dp,
        sequence_parallel=sp, micro_batch_size=micro_batch_size, grad_accum_steps=accum,
        global_batch_size=global_batch, seq_length=seq,
    )


def _rank_params(recipe: ModelRecipe, layout: Layout, padded_vocab: int, pipeline_rank: int) -> int:
    """Return the parameters one TP rank of pipeline rank `pipeline_rank` holds."""
    h, t, kv = recipe.hidden_size, layout.tensor, recipe.num_query_groups * recipe.head_dim
    q = recipe.num_attention_heads * recipe.head_dim
    matrices = h * (q + 2 * kv) + q * h + 3 * h * recipe.ffn_hidden_size  # qkv, proj, fc1 [gate; up], fc2
    layer = matrices // t + 2 * h  # TP splits the matrices; the two norms are replicated
    params = recipe.num_layers // layout.pipeline * layer
    first, last = pipeline_rank == 0, pipeline_rank == layout.pipeline - 1
    if first:
        params += padded_vocab * h // t  # VocabParallelEmbedding
    if last:
        params += h  # final norm
        # output layer; tied to the embedding, it is a copy on the last stage when that is not the first
        if not recipe.tie_embeddings or not first:
            params += padded_vocab * h // t
    return params


def _in_flight(layout: Layout, pipeline_rank: int) -> int:
    """Return how many micro-batches (model-chunk passes when interleaved) hold activations at the peak.

    megatron's schedules.get_pp_rank_microbatches: rank r runs PP - r - 1 warmup
    forwards under 1F1B, 2 (PP - r - 1) + (VPP - 1) PP interleaved, then one
    more forward before its first backward; never more than the step has.
    """
    p, m, micro_batches = layout.pipeline, layout.virtual_pipeline, layout.grad_accum_steps
    if p == 1:
        return 1
    if m == 1:
        return min(p - pipeline_rank, micro_batches)
    return min(2 * (p - pipeline_rank - 1) + (m - 1) * p + 1, micro_batches * m)


def _activations(
    recipe: ModelRecipe, layout: Layout, padded_vocab: int, element: int, pipeline_rank: int
) -> tuple[int, int]:
    """Return (activation bytes held by pipeline rank `pipeline_rank`, micro-batches in flight)."""
    h, t, d = recipe.hidden_size, layout.tensor, recipe.head_dim
    heads, groups, f = recipe.num_attention_heads, recipe.num_query_groups, recipe.ffn_hidden_size
    q, kv = heads * d, groups * d
    tokens = layout.micro_batch_size * layout.seq_length // layout.context
    sp = t if layout.sequence_parallel else 1
    # With fewer query groups than TP ranks each rank all-gathers the qkv output and keeps one group's K and V.
    qkv_out, kv_rank = ((q + 2 * kv) // t, kv // t) if groups >= t else (q + 2 * kv, d)
    # The residual stream is fp32 (fp32 weights, autocast casts only the matmul inputs): 4 B norm inputs.
    norms = 2 * h * (4 + element)  # two norms: fp32 input, and the output that feeds the next linear
    split = qkv_out + q // t + kv_rank + q // t + 4 * f // t  # qkv out, rotated q and k, attention out, MLP
    layer = tokens * norms // sp + tokens * element * split
    in_flight = _in_flight(layout, pipeline_rank)
    layers_per_pass = recipe.num_layers // (layout.pipeline * layout.virtual_pipeline)
    held = in_flight * layers_per_pass * layer
    if pipeline_rank == layout.pipeline - 1:
        # final norm (fp32 input, output feeding the output layer) and the fp32 softmax the cross entropy keeps
        held += tokens * (4 + element) * h // sp + tokens * 4 * padded_vocab // t
    return held, in_flight


def estimate_memory(recipe: ModelRecipe, layout: Layout, vocab_size: int, bf16: bool,
                    distributed_optimizer: bool) -> MemoryEstimate:
    """Return the training memory of the most loaded rank of `layout`, in bytes (a MemoryEstimate).

    `vocab_size` is the tokenizer's; it is padded as the model pads it. The
    weights stay fp32 (4 B/param: `bf16` is autocast, as in
    `recipes.megatron_model.transformer_config`), gradients are fp32 (4 B:
    megatron DDP's grad buffer, reduced in fp32), Adam keeps exp_avg and
    exp_avg_sq in fp32 (8 B), split over DP x CP ranks with the distributed
    optimizer. Parameters per rank: the rank's num_layers / PP layers with
    their matrices split over TP and norms replicated; the first pipeline rank
    also holds the embedding, the last the final norm and the output layer.

    Activations adapt Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", sec. 4): their per-layer
    s·b·h·(34 + 5·a·s/h) bytes (fp16, GeLU MLP of 4h, dropout, attention
    scores stored) become, with T = b·s/CP tokens per rank and e bytes per
    element (2 under bf16 autocast, else 4),

        T · [ 2h(4 + e) / SP  +  e · (qkv + q/TP + k + q/TP + 4f/TP) ]

    per layer and micro-batch: the two norms keep their fp32 input (the
    residual stream) and their output that feeds the next linear (divided by
    TP only under sequence parallelism); no dropout masks (dropout is 0); no
    s² terms (fused attention: SDPA on CPU, Transformer Engine on GPU, keeps
    Q, K, V, the output and the softmax statistics); GQA: the qkv projection
    output (q + 2·kv)/TP, from which V is a view, plus the rotated q (q/TP) and
    k (kv/TP); SwiGLU: fc1's [gate; up] output (2f), silu(gate) (f) and fc2's
    input (f), all /TP. The last pipeline rank adds the final norm's input and
    output and the fp32 softmax of the cross entropy, T·V/TP·4 B. Pipeline rank
    r holds its layers' activations for the micro-batches in flight (1F1B:
    min(PP - r, M); interleaved: min(2(PP - r - 1) + (VPP - 1)·PP + 1, M·VPP)
    model-chunk passes of num_layers/(PP·VPP) layers: L(1 + (PP-1)/(PP·VPP))
    layers on the first rank, as in the paper). Not counted: transient buffers
    (all-gathers, the logits' gradient, p2p buffers), the CUDA context and
    allocator fragmentation. On the tiny recipe this is within ~15% of the
    bytes autograd saves (tests/test_parallel_plan.py).
    """
    padded_vocab = recipe.padded_vocab_size(vocab_size, layout.tensor)
    element = 2 if bf16 else 4
    shards = layout.data * layout.context if distributed_optimizer else 1
    estimates = []
    for rank in range(layout.pipeline):
        params = _rank_params(recipe, layout, padded_vocab, rank)
        activations, in_flight = _activations(recipe, layout, padded_vocab, element, rank)
        estimates.append(MemoryEstimate(
            pipeline_rank=rank, params=params, model_params=recipe.num_params(padded_vocab), padded_vocab=padded_vocab,
            weights=4 * params, gradients=4 * params, optimizer=-(-8 * params // shards), activations=activations,
            in_flight=in_flight, optimizer_shards=shards, activation_bytes=element,
        ))
    return max(estimates, key=lambda e: e.total)


def _count(n: int) -> str:
    """Return a parameter count for people: 8.03 B, 3.15 M, 512."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    """Return a byte count in GiB, or MiB below one GiB."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def layout_table(recipe: ModelRecipe, layout: Layout, estimate: MemoryEstimate) -> Table:
    """Return a rich Table of the plan: model, layout, batch and the per-rank memory estimate."""
    extras = [f"VPP {layout.virtual_pipeline}"] * (layout.virtual_pipeline > 1)
    extras += ["sequence parallel"] * layout.sequence_parallel
    passes = "model-chunk pass" if layout.virtual_pipeline > 1 else "micro-batch"
    passes += "es" * (estimate.in_flight != 1)
    dtype = "bf16" if estimate.activation_bytes == 2 else "fp32"
    split = f", split over DP x CP = {estimate.optimizer_shards}" if estimate.optimizer_shards > 1 else ""
    table = Table(title=f"pretrain plan: {recipe.name}")
    for name, justify in (("", "left"), ("value", "right"), ("", "left")):
        table.add_column(name, justify=justify)
    rows = [
        ("model", recipe.name, f"{recipe.num_layers} layers, hidden {recipe.hidden_size}, "
         f"{recipe.num_attention_heads} heads ({recipe.num_query_groups} KV groups), FFN {recipe.ffn_hidden_size}"),
        ("parameters", _count(estimate.model_params),
         f"{estimate.model_params:,} with the vocabulary padded to {estimate.padded_vocab:,}"),
        ("layout", f"TP {layout.tensor} x PP {layout.pipeline} x CP {layout.context} x DP {layout.data} "
         f"= {layout.world_size}", ", ".join(extras)),
        ("sequence length", f"{layout.seq_length:,}", "tokens"),
        ("micro batch", f"{layout.micro_batch_size}", "sequences per forward pass per data-parallel rank"),
        ("gradient accumulation", f"{layout.grad_accum_steps}", "micro-batches per optimizer step"),
        ("global batch", f"{layout.global_batch_size:,}", f"sequences = {layout.tokens_per_step:,} tokens per step"),
        ("weights", _bytes(estimate.weights),
         f"fp32, {_count(estimate.params)} parameters on each rank of pipeline stage {estimate.pipeline_rank}"),
        ("gradients", _bytes(estimate.gradients), "fp32"),
        ("Adam state", _bytes(estimate.optimizer), f"fp32 exp_avg + exp_avg_sq{split}"),
        ("activations", _bytes(estimate.activations), f"{dtype}, {estimate.in_flight} {passes} in flight"),
        ("total", _bytes(estimate.total), f"per rank of pipeline stage {estimate.pipeline_rank}, the most loaded"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def describe_plan(recipe: ModelRecipe, layout: Layout, estimate: MemoryEstimate) -> str:
    """Return `layout_table` rendered as plain text."""
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(layout_table(recipe, layout, estimate))
    return console.file.getvalue()


# PretrainConfig fields that override the model recipe's field of the same name (0: the recipe's value).
ARCHITECTURE_OVERRIDES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                          "rotary_base")


def stage_recipe(cfg) -> ModelRecipe:
    """Return the model recipe `cfg.model` of a PretrainConfig with its architecture and parallelism overrides."""
    return get_model_recipe(
        cfg.model,
        **{name: getattr(cfg, name) for name in ARCHITECTURE_OVERRIDES},
        parallelism={"tensor": cfg.tensor_parallel, "pipeline": cfg.pipeline_parallel,
                     "virtual_pipeline": cfg.virtual_pipeline_parallel, "context": cfg.context_parallel},
    )


def resolve_pretrain(cfg, world_size: int, transformer_engine: bool | None = None) -> tuple[ModelRecipe, Layout]:
    """Return (recipe, layout) of a PretrainConfig on `world_size` ranks, or raise LayoutError with every problem.

    The micro-batch size 0 takes the recipe's; the accumulation steps come from
    the global batch where there is one (see `resolve_layout`).
    """
    recipe = stage_recipe(cfg)
    layout = resolve_layout(recipe, world_size, cfg.micro_batch_size or recipe.micro_batch_size,
                            cfg.global_batch_size, cfg.grad_accum_steps, cfg.seq_length,
                            transformer_engine=transformer_engine)
    return recipe, layout


def dry_run(cfg, world_size: int, executor: str) -> Table:
    """Return the plan table `aigc pretrain --dry-run` prints: layout, global batch, per-rank memory.

    On Slurm the ranks are assumed to have GPUs and Transformer Engine (a
    cluster container); locally this machine is asked. The vocabulary is the
    recipe's (or 4096, the embedded default's tokenizer, for a recipe without one).
    """
    slurm = executor == "slurm"
    recipe, layout = resolve_pretrain(cfg, world_size, transformer_engine=True if slurm else None)
    if slurm:
        bf16 = cfg.bf16
    else:
        import torch  # what this machine runs: fp32 without CUDA

        bf16 = cfg.bf16 and torch.cuda.is_available()
    estimate = estimate_memory(recipe, layout, recipe.vocab_size or 4096, bf16=bf16, distributed_optimizer=False)
    return layout_table(recipe, layout, estimate)
