"""Sharded training checkpoints that any parallel layout can resume from (safetensors + JSON, no pickles).

A checkpoint of step s is a directory `step_<s>/` under the checkpoint root:

    index.json                 every stored piece: kind/name|dim|start|length -> its file; each
                               tensor's canonical shape; the layout it was saved from
    train_state.json           step, consumed samples, loss history, train seconds (JSON)
    shards/rank<r>.safetensors the pieces rank r owns: model weights ("model/"), AdamW moments
                               ("exp_avg/", "exp_avg_sq/"), each in canonical coordinates
    rng/rank<r>.safetensors    rank r's torch RNG states (CPU, and CUDA where present)

Pieces are the `recipes.sharding` placements of each rank's parameters, so a
piece says where it sits in the whole (one-process) model. Each piece is
written once, by the lowest rank holding it (data-parallel replicas, replicated
norms and a tied output layer write nothing twice). Loading fills every local
parameter (and its AdamW state) from whichever saved pieces overlap it: a
checkpoint saved at TP=2 resumes at TP=1, PP=2 or DP=2.

Atomic: every rank writes into `step_<s>.tmp/`; rank 0 writes index.json and
train_state.json last, after all ranks have written, and renames the directory;
a checkpoint is visible only when complete. The newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recipes.loop_checkpoint import checkpoints, latest, prune  # noqa: F401  (the step_<s>/ layout both share)
from recipes.sharding import Placement, local_view, placements

MOMENTS = ("exp_avg", "exp_avg_sq")


def _collective() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if _collective():
        torch.distributed.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not _collective():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _torch_optimizers(optimizer) -> dict[int, torch.optim.Optimizer]:
    """Return id(param) -> the torch AdamW holding it, inside megatron's (possibly chained) optimizer."""
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return {id(p): opt for opt in inner for group in opt.param_groups for p in group["params"]}


def _param_placements(chunks: list[torch.nn.Module]) -> list[tuple[torch.nn.Parameter, Placement]]:
    """Return (parameter, placement) of every parameter of this rank's model chunks."""
    result = []
    for chunk in chunks:
        table = placements(chunk)
        result += [(param, table[name]) for name, param in chunk.named_parameters()]
    return result


def _local_pieces(chunks, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Return (storage key -> tensor, canonical name -> global shape) of this rank's pieces."""
    owners = _torch_optimizers(optimizer) if optimizer is not None else {}
    tensors, shapes = {}, {}
    for param, placement in _param_placements(chunks):
        shapes[placement.name] = list(placement.global_shape)
        state = owners[id(param)].state.get(param) if id(param) in owners else None
        for piece, key in zip(placement.pieces, placement.piece_keys()):
            tensors[f"model/{key}"] = local_view(param.detach(), placement, piece)
            for moment in MOMENTS if state else ():
                tensors[f"{moment}/{key}"] = local_view(state[moment], placement, piece)
    return tensors, shapes


def save(root: Path, chunks: list[torch.nn.Module], optimizer, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of `state["step"]` under `root` (collective: every rank calls it); return its path."""
    rank = _rank()
    final = root / f"step_{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "shards").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    tensors, shapes = _local_pieces(chunks, optimizer)
    owners: dict[str, int] = {}
    for r, keys in enumerate(_all_gather(sorted(tensors))):
        for key in keys:
            owners.setdefault(key, r)
    mine = {k: v.contiguous().cpu() for k, v in tensors.items() if owners[k] == rank}
    shard_file = f"shards/rank{rank:05d}.safetensors"
    if mine:
        save_file(mine, tmp / shard_file)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng" / f"rank{rank:05d}.safetensors")
    parts = _all_gather(({k: shard_file for k in mine}, shapes))  # every rank has written its files
    if rank == 0:
        index = {"pieces": {}, "shapes": {}, "world_size": len(parts), "layout": state.get("layout", {})}
        for pieces, part_shapes in parts:
            index["pieces"].update(pieces)
            index["shapes"].update(part_shapes)
        (tmp / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune(root, keep)
    _barrier()
    return final


class _Pieces:
    """The stored pieces of one checkpoint, read lazily by canonical name."""

    def __init__(self, path: Path):
        self.path = path
        self.index = json.loads((path / "index.json").read_text())
        self.by_name: dict[str, list[tuple[int | None, int, int, str]]] = {}
        for key, file in self.index["pieces"].items():
            kind_name, dim, start, length = key.split("|")
            self.by_name.setdefault(kind_name, []).append(
                (None if dim == "-" else int(dim), int(start), int(length), key))
        self._files: dict[str, Any] = {}

    def _slice(self, key: str):
        file = self.index["pieces"][key]
        if file not in self._files:
            self._files[file] = safe_open(str(self.path / file), framework="pt")
        return self._files[file].get_slice(key)

    def fill(self, target: torch.Tensor, kind_name: str, dim: int | None, start: int) -> None:
        """Copy into `target` the region of canonical tensor `kind_name` that starts at `start` along `dim`."""
        stored = self.by_name.get(kind_name)
        if not stored:
            raise KeyError(f"checkpoint {self.path} holds no {kind_name!r}")
        if dim is None:
            target.copy_(self._slice(stored[0][3])[:])
            return
        end, covered = start + target.shape[dim], 0
        for _, s, length, key in stored:
            lo, hi = max(s, start), min(s + length, end)
            if lo >= hi:
                continue
            index = (slice(None),) * dim + (slice(lo - s, hi - s),)
            target.narrow(dim, lo - start, hi - lo).copy_(self._slice(key)[index])
            covered += hi - lo
        if covered != end - start:
            raise RuntimeError(f"checkpoint {self.path} covers {covered} of rows {start}..{end} of {kind_name!r}")

    def full(self, kind: str, name: str) -> torch.Tensor:
        """Return canonical tensor `name` of `kind` ("model", "exp_avg", ...) assembled from its pieces."""
        shape = self.index["shapes"][name]
        out = torch.empty(shape)
        stored = self.by_name[f"{kind}/{name}"]
        self.fill(out, f"{kind}/{name}", stored[0][0], 0)
        return out


def load(path: Path, chunks: list[torch.nn.Module], optimizer) -> dict[str, Any]:
    """Fill this rank's model chunks and AdamW state from checkpoint `path` (any layout); return its train state."""
    pieces = _Pieces(path)
    state = json.loads((path / "train_state.json").read_text())
    owners = _torch_optimizers(optimizer) if optimizer is not None else {}
    with torch.no_grad():
        for param, placement in _param_placements(chunks):
            if list(placement.global_shape) != pieces.index["shapes"].get(placement.name):
                raise RuntimeError(f"checkpoint {path}: {placement.name} is {pieces.index['shapes'].get(placement.name)}"
                                   f", the model's is {list(placement.global_shape)}")
            moments = {}
            if id(param) in owners and state["step"] > 0:
                moments = {m: torch.zeros_like(param) for m in MOMENTS}
                # torch's AdamW keeps its step count as a float tensor on the CPU (not fused, not capturable)
                owners[id(param)].state[param] = {"step": torch.tensor(float(state["step"])), **moments}
            for piece in placement.pieces:
                for kind, tensor in (("model", param), *moments.items()):
                    pieces.fill(local_view(tensor, placement, piece), f"{kind}/{placement.name}", placement.dim,
                                piece[0])
    rng_file = path / "rng" / f"rank{_rank():05d}.safetensors"
    if pieces.index["world_size"] == (torch.distributed.get_world_size() if _collective() else 1) and rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def full_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Return every canonical model tensor of checkpoint `path`, whole (what the HF export maps)."""
    pieces = _Pieces(path)
    return {name: pieces.full("model", name) for name in pieces.index["shapes"]}
