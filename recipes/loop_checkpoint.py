"""Periodic, atomic checkpoints of the HF-model training loops (sft, reward model, SteerLM, DPO's policy, PPO, GRPO).

A checkpoint of step s of a loop is a directory `step_<s>/` under the loop's root:

    weights.safetensors     the trainable weights of each module: "<module>/<parameter name>"
                            (a LoRA adapter, or every weight; frozen bases are re-read from upstream)
    optimizer.safetensors   each optimizer's state tensors: "<optimizer>/<param index>/<key>" (AdamW moments, step)
    rng/rank<r>.safetensors rank r's torch RNG states (CPU, and CUDA where present)
    train_state.json        step, the loop's own state (data order, Python RNG, logs, controllers),
                            optimizer hyper-parameters and LR-schedule states

No pickles anywhere. Data-parallel replicas hold the same weights, so rank 0
writes them; every rank writes its RNG states. Atomic as
`recipes.dist_checkpoint`: written into `step_<s>.tmp/`, train_state.json last
(after every rank has written), then renamed; the newest `keep` are kept. A
loop also saves at its last step, so a finished phase of a multi-phase stage
(align: reward model, then the method) restores as finished and is not re-run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recipes.data_parallel import DataParallel


STEP_DIR = re.compile(r"^step_(\d{7})$")


def checkpoints(root: Path) -> list[Path]:
    """Return the complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    """Return the newest complete checkpoint under `root`, or None."""
    found = checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and unfinished ones, under `root`."""
    for path in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob("step_*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def python_rng_state(rng: random.Random) -> list:
    """Return the state of `rng` as JSON-able lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng: random.Random, saved: list) -> None:
    """Restore `rng` to a state from python_rng_state."""
    rng.setstate((saved[0], tuple(saved[1]), saved[2]))


def resume_with_generator(checkpoints: "LoopCheckpoints", modules: dict[str, torch.nn.Module],
                          optimizers: dict[str, torch.optim.Optimizer], gen: torch.Generator) -> tuple[int, dict]:
    """Restore the newest checkpoint and the loop's own generator `gen`; return (its step, the loop's state).

    Return (0, {}) where there is none. The state was saved with
    `save_with_generator`, which stores `gen`'s state beside the loop's.
    """
    resumed = checkpoints.restore(modules, optimizers, {})
    if not resumed:
        return 0, {}
    state = dict(resumed["state"])
    gen.set_state(torch.tensor(state.pop("generator"), dtype=torch.uint8))
    return resumed["step"], state


def save_with_generator(checkpoints: "LoopCheckpoints", step: int, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], gen: torch.Generator, state: dict) -> Path:
    """Save the checkpoint of `step` with the loop's generator `gen` and JSON-able `state`; return its path."""
    return checkpoints.save(step, modules, optimizers, {}, {**state, "generator": gen.get_state().tolist()})


def latest_step(root: Path | None) -> int:
    """Return the step of the newest complete checkpoint under `root` (0 where there is none)."""
    path = latest(root) if root is not None else None
    return int(path.name.split("_")[1]) if path else 0


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Return name -> parameter of the weights of `module` that train."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _without_params(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


class LoopCheckpoints:
    """The checkpoints of one training loop under `root`: due every `every` steps and at the last; newest `keep` kept.

    `root=None` (or every=0) turns checkpointing off: due() is always False and restore() None.
    """

    def __init__(self, root: Path | None, every: int, keep: int = 2, dp: DataParallel | None = None):
        self.root = root if every > 0 else None
        self.every, self.keep = every, max(keep, 1)
        self.dp = dp or DataParallel.current()

    def due(self, step: int, last: int) -> bool:
        """Return True where step `step` of a loop of `last` steps ends with a checkpoint."""
        return self.root is not None and (step % self.every == 0 or step == last)

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             schedules: dict[str, Any], state: dict[str, Any]) -> Path:
        """Write the checkpoint of `step` (collective: every rank calls it); return its path.

        `state` is the loop's own JSON-able state (data order, Python RNG, logs).
        """
        assert self.root is not None
        final = self.root / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.dp.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.dp.barrier()
        if self.dp.is_main:
            weights = {f"{m}/{n}": p.detach().cpu().contiguous()
                       for m, module in modules.items() for n, p in _trainable(module).items()}
            save_file(weights, tmp / "weights.safetensors")
            moments = {f"{o}/{i}/{k}": v.detach().cpu().contiguous().clone()
                       for o, opt in optimizers.items() for i, s in opt.state_dict()["state"].items()
                       for k, v in s.items() if torch.is_tensor(v)}
            save_file(moments, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng" / f"rank{self.dp.rank:05d}.safetensors")
        self.dp.barrier()  # every rank has written its files
        if self.dp.is_main:
            record = {
                "step": step,
                "world_size": self.dp.world_size,
                "state": state,
                "optimizers": {o: _without_params(opt.state_dict()["param_groups"]) for o, opt in optimizers.items()},
                "schedules": {s: sched.state_dict() for s, sched in schedules.items()},
            }
            (tmp / "train_state.json").write_text(json.dumps(record))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            prune(self.root, self.keep)
        self.dp.barrier()
        return final

    def restore(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                schedules: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest checkpoint into the modules, optimizers, schedules and this rank's RNG.

        Return {"step", "state"} of the checkpoint, or None where there is none
        (a fresh start). Raises ValueError where it was saved by another number
        of ranks (each rank's RNG state would not match its stream).
        """
        path = latest(self.root) if self.root is not None else None
        if path is None:
            return None
        record = json.loads((path / "train_state.json").read_text())
        if record["world_size"] != self.dp.world_size:
            raise ValueError(f"{path} was saved by {record['world_size']} rank(s), this run has "
                             f"{self.dp.world_size}: resume with as many ranks, or delete {self.root}")
        weights = load_file(path / "weights.safetensors")
        for m, module in modules.items():
            params = _trainable(module)
            missing = set(params) - {k.split("/", 1)[1] for k in weights if k.startswith(f"{m}/")}
            if missing:
                raise ValueError(f"{path} lacks {len(missing)} trainable weight(s) of {m}, e.g. {sorted(missing)[0]}")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(weights[f"{m}/{n}"])
        moments = load_file(path / "optimizer.safetensors")
        for o, opt in optimizers.items():
            current = opt.state_dict()
            groups = [{**saved, "params": g["params"]}
                      for saved, g in zip(record["optimizers"][o], current["param_groups"])]
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in moments.items():
                name, index, field = key.split("/")
                if name == o:
                    state.setdefault(int(index), {})[field] = value
            opt.load_state_dict({"state": state, "param_groups": groups})
        for s, sched in schedules.items():
            sched.load_state_dict(record["schedules"][s])
        rng = load_file(path / "rng" / f"rank{self.dp.rank:05d}.safetensors")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return {"step": record["step"], "state": record["state"]}
