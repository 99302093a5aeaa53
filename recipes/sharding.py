"""Where each local parameter of a (TP/PP-sharded) GPTModel sits in the whole model, by canonical name.

The canonical form of the model is the one-process megatron model with the
local layer spec: names like `decoder.layers.<global layer>.mlp.linear_fc1.weight`
(`recipes.hf_export.megatron_to_hf` maps exactly these to HF Llama). On a rank
of a parallel layout, a parameter holds part of one canonical tensor:

- pipeline parallel: the rank's layers are a contiguous block; a local layer's
  global index is `layer.layer_number - 1`;
- tensor parallel, split along dim 0 (column-parallel: `linear_qkv`, the vocab
  embedding and output layer) or dim 1 (row-parallel: `linear_proj`,
  `linear_fc2`), TP rank r holding the r-th contiguous block;
- SwiGLU's `linear_fc1` is [gate; up] in canonical form and [gate_r; up_r]
  on TP rank r: two blocks of dim 0;
- norms are replicated; a tied output layer on the last pipeline stage is a
  copy of the canonical embedding.

`placements` lists each local parameter's pieces (canonical start, local
start, length along the split dim). The same placements serve three jobs:
layout-independent initialisation (`init_weights`: every canonical tensor is
drawn from a generator seeded by the run seed and its name, so TP=2, PP=2 and
one process start from identical weights), sharded checkpoints that reshard
(`recipes.dist_checkpoint`), and the HF export of a sharded model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import torch
from megatron.core import parallel_state

# Transformer Engine's layer spec fuses each norm into the linear that follows it.
TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
SPLIT_DIM = {  # canonical name suffix -> the dim tensor parallelism splits (None: replicated)
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    "input_layernorm.weight": None,
    "pre_mlp_layernorm.weight": None,
    "final_layernorm.weight": None,
}
SCALED_INIT = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")  # megatron's output_layer_init_method
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a local parameter sits in its canonical tensor."""

    name: str  # canonical name
    global_shape: tuple[int, ...]
    dim: int | None  # the split dim; None = the whole tensor (replicated)
    pieces: tuple[tuple[int, int, int], ...]  # (canonical start, local start, length) along `dim`

    def piece_keys(self) -> list[str]:
        """Return one storage key per piece: `name|dim|start|length` (dim '-' when replicated)."""
        if self.dim is None:
            return [f"{self.name}|-|0|{self.global_shape[0]}"]
        return [f"{self.name}|{self.dim}|{start}|{length}" for start, _, length in self.pieces]


def canonical_name(local: str, layer_numbers: dict[int, int], tied: bool) -> str:
    """Return the canonical name of local parameter `local` (layer_numbers: local index -> global 1-based)."""
    for te, plain in TE_TO_LOCAL.items():
        local = local.replace(te, plain)
    if tied and local == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    match = LAYER.match(local)
    if match:
        return f"decoder.layers.{layer_numbers[int(match.group(1))] - 1}." + local[match.end():]
    return local


def _split_dim(name: str) -> int | None:
    for suffix, dim in SPLIT_DIM.items():
        if name.endswith(suffix):
            return dim
    raise KeyError(f"no tensor-parallel placement known for parameter {name!r}")


def placements(model: torch.nn.Module) -> dict[str, Placement]:
    """Return local parameter name -> its Placement, for this rank's `model` (a GPTModel, unwrapped).

    The TP rank and size come from megatron's parallel state.
    """
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    layer_numbers = {i: layer.layer_number for i, layer in enumerate(model.decoder.layers)}
    tied = model.share_embeddings_and_output_weights
    result = {}
    for local, param in model.named_parameters():
        name = canonical_name(local, layer_numbers, tied)
        dim = _split_dim(name)
        shape = tuple(param.shape)
        if dim is None:
            result[local] = Placement(name, shape, None, ((0, 0, shape[0]),))
            continue
        n = shape[dim]
        global_shape = shape[:dim] + (n * tp,) + shape[dim + 1:]
        if name.endswith("mlp.linear_fc1.weight"):  # [gate_r; up_r] of canonical [gate; up]
            half = n // 2
            pieces = ((tp_rank * half, 0, half), (tp * half + tp_rank * half, half, half))
        else:
            pieces = ((tp_rank * n, 0, n),)
        result[local] = Placement(name, global_shape, dim, pieces)
    return result


def local_view(param: torch.Tensor, placement: Placement, piece: tuple[int, int, int]) -> torch.Tensor:
    """Return the view of local tensor `param` that holds `piece` of its placement."""
    if placement.dim is None:
        return param
    _, local_start, length = piece
    return param.narrow(placement.dim, local_start, length)


def canonical_init(name: str, shape: tuple[int, ...], seed: int, std: float, num_layers: int) -> torch.Tensor:
    """Return the canonical tensor `name` of a fresh model: N(0, std) (scaled for output projections), norms 1.

    Drawn on the CPU from a generator seeded by (seed, name): the same on every
    layout and device.
    """
    if _split_dim(name) is None:
        return torch.ones(shape)
    if name.endswith(SCALED_INIT):
        std = std / math.sqrt(2.0 * num_layers)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float, num_layers: int) -> None:
    """Set every parameter of this rank's `model` to its part of the canonical fresh model (in place)."""
    table = placements(model)
    for local, param in model.named_parameters():
        placement = table[local]
        full = canonical_init(placement.name, placement.global_shape, seed, std, num_layers)
        for piece in placement.pieces:
            source = full if placement.dim is None else full.narrow(placement.dim, piece[0], piece[2])
            local_view(param, placement, piece).copy_(source)
