"""Data parallelism for the HF-model stages (sft, align): each rank trains on its share of every global batch.

The global batch is drawn the same way on every rank (one seeded order), so it
does not depend on the world size; rank r takes the r-th contiguous share of
every micro-batch. A loss that is a sum over the global batch divided by its
size (tokens, pairs, sequences) is computed on each rank as its share's sum
over the *global* size; `reduce_gradients` then sums the gradients over the
ranks (one all-reduce of one flat buffer per optimizer step, on the process
group the runner joined: gloo on CPU, NCCL on GPU), which gives every rank the
one-process gradient up to the order of float additions.

Why not DistributedDataParallel: the alignment loops train several models
(policy, critic) with forwards that are not the module's own (per-token values
from a scoring model's trunk and head), which DDP's forward-hook contract does
not fit; and with gradient accumulation DDP reduces every micro-batch unless
told not to. What DDP adds on top (overlapping the reduction with the
backward) matters on GPU clusters; see the README's scale notes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """This process's rank among `world_size` data-parallel replicas (1 = a single process)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        """Return the data-parallel world of the default process group (one process where none)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Return True on rank 0, the one rank that writes shared outputs."""
        return self.rank == 0

    def check_divides(self, size: int, what: str) -> None:
        """Raise ValueError where `size` (a batch, in rows) cannot be shared evenly by the ranks."""
        if size % self.world_size:
            raise ValueError(f"{what}={size} cannot be shared by {self.world_size} data-parallel ranks: "
                             f"make it a multiple of {self.world_size}")

    def share(self, rows: Sequence[T], even: bool = True) -> list[T]:
        """Return this rank's contiguous share of `rows` (even=True: every rank gets exactly len / world_size)."""
        if even:
            self.check_divides(len(rows), "batch")
        n, w = len(rows), self.world_size
        return list(rows[n * self.rank // w : n * (self.rank + 1) // w])

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks in place (one all-reduce of a flat buffer; no-op on one rank).

        A parameter without a gradient on this rank counts as zero.
        """
        if self.world_size == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g)  # views of the one reduced buffer
            offset += g.numel()

    def sum(self, value: float) -> float:
        """Return the sum over ranks of a Python number (itself on one rank)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return every rank's `tensor` (same shape on each) concatenated along dim 0 in rank order."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj: T) -> list[T]:
        """Return every rank's picklable-in-memory `obj` in rank order (never written to a file)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (no-op on one)."""
        if self.world_size > 1:
            torch.distributed.barrier()
