"""Training checkpoints of the pretrain stage: everything a resumed run needs to continue exactly.

A checkpoint is a directory:

    model.safetensors        the model's weights, by megatron state-dict name
    train_state.safetensors  AdamW moments and step counts (by parameter name), torch RNG state
                             (not in the GPU path's final checkpoint, which cannot be resumed)
    train_state.json         step, loss history

No pickles. Writing is atomic: the new checkpoint is written beside the live one,
then swapped in with two renames; a kill at any point leaves a complete
checkpoint at `checkpoint/` or, between the renames, at `checkpoint.prev/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's tensors by state-dict name (TE's `_extra_state` entries left out)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
) -> Path:
    """Write model, optimizer, RNG and `state` (JSON-ready, holds "step") to `path` atomically; return it.

    Without an optimizer (the GPU path's final weights) there is no
    train_state.safetensors and the checkpoint cannot be resumed from.
    """
    new, prev = path.with_name(path.name + ".next"), path.with_name(path.name + ".prev")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file(model_weights(model), new / "model.safetensors")
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = {"rng.torch": torch.get_rng_state()}
        for param, moments in optimizer.state.items():
            for key in MOMENTS:
                tensors[f"{names[id(param)]}.{key}"] = moments[key].detach().clone()
        save_file(tensors, new / "train_state.safetensors")
    (new / "train_state.json").write_text(json.dumps(state, indent=1))
    if path.exists():
        shutil.rmtree(prev, ignore_errors=True)
        path.rename(prev)
    new.rename(path)
    shutil.rmtree(prev, ignore_errors=True)
    return path


def find_checkpoint(path: Path) -> Path | None:
    """Return the complete resumable checkpoint at `path` (or its `.prev` left by a kill mid-swap), else None."""
    for candidate in (path, path.with_name(path.name + ".prev")):
        if (candidate / "train_state.json").is_file() and (candidate / "train_state.safetensors").is_file():
            return candidate
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG from checkpoint `path` in place; return its JSON state."""
    weights = load_file(path / "model.safetensors")
    expected = set(model_weights(model))
    if set(weights) != expected:
        raise RuntimeError(
            f"checkpoint {path} does not fit the model: missing {sorted(expected - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - expected)[:5]}"
        )
    model.load_state_dict(weights, strict=False)
    tensors = load_file(path / "train_state.safetensors")
    torch.set_rng_state(tensors["rng.torch"])
    for name, param in model.named_parameters():
        if f"{name}.step" in tensors:
            moments = {key: tensors[f"{name}.{key}"].to(param.device) for key in ("exp_avg", "exp_avg_sq")}
            optimizer.state[param] = {"step": tensors[f"{name}.step"], **moments}  # AdamW keeps step on CPU
    return json.loads((path / "train_state.json").read_text())
