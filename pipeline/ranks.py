"""This process's place in a multi-process launch (torchrun, or srun without torchrun), and the runner's collectives.

A stage launched as N processes runs `pipeline.runner.execute_stage` in every
one of them. `ranks_from_env` tells each its rank; `init_distributed` joins the
default torch.distributed process group (env:// rendezvous), which stages then
reuse (`torch.distributed.is_initialized()`). The runner coordinates the ranks
(who prepares the work directory, who publishes) on a group of its own
(`runner_group`), so its collectives never pair up with a stage's.

torch is imported inside the functions that need it: `import pipeline...` stays
light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
from typing import Any, Iterator, MutableMapping

SLURM_PORT_BASE = 20000  # MASTER_PORT of an srun launch = base + job id % SLURM_PORT_SPAN
SLURM_PORT_SPAN = 20000


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process stands in its launch: global rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Return True on rank 0, the one rank that writes shared outputs."""
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """Return the first host of a Slurm node list ("n1,n2" or a range such as "gpu[03-07]")."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    return hosts[0]


def ranks_from_env(env: MutableMapping[str, str] | None = None) -> Ranks:
    """Return this process's Ranks from its environment (default os.environ).

    torchrun's RANK / WORLD_SIZE / LOCAL_RANK come first. Else, inside a Slurm
    job step (srun without torchrun: SLURM_STEP_ID is set, which a batch script
    itself lacks) SLURM_PROCID / SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) /
    SLURM_LOCALID; then MASTER_ADDR (first host of the step), MASTER_PORT
    (from the job id), RANK, WORLD_SIZE and LOCAL_RANK are set where unset, so
    torch's env:// rendezvous works. Else a single process (0, 1, 0).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        ranks = Ranks(int(env["SLURM_PROCID"]),
                      int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"),
                      int(env.get("SLURM_LOCALID", "0")))
        if ranks.world_size > 1:
            if "MASTER_ADDR" not in env:
                env["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
            env.setdefault("MASTER_PORT", str(SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN))
            env.setdefault("RANK", str(ranks.rank))
            env.setdefault("WORLD_SIZE", str(ranks.world_size))
            env.setdefault("LOCAL_RANK", str(ranks.local_rank))
        return ranks
    return Ranks()


def init_distributed(ranks: Ranks) -> bool:
    """Join the default process group (env:// rendezvous) where world_size > 1 and none exists yet.

    On a CUDA machine the rank takes GPU `local_rank` and the group is
    gloo for CPU tensors and NCCL for CUDA ones; else gloo. Return True where
    this call created the group (the caller then destroys it), False otherwise.
    """
    if ranks.world_size == 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {ranks.local_rank} but {torch.cuda.device_count()} visible GPU(s): "
                               "start at most one rank per GPU on each node")
        torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", init_method="env://")
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return True


def runner_group() -> Any:
    """Return a new gloo process group of every rank, for the runner's own collectives (call on every rank)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def broadcast_from_main(obj: Any, group: Any) -> Any:
    """Return rank 0's `obj` on every rank of `group` (JSON-able; other values as str, as in manifests)."""
    import torch.distributed as dist

    box = [json.dumps(obj, default=str) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return json.loads(box[0])


def all_gather(obj: Any, group: Any) -> list[Any]:
    """Return every rank's `obj`, in rank order, on every rank of `group` (JSON-able; other values as str)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, json.dumps(obj, default=str), group=group)
    return [json.loads(text) for text in gathered]


@contextlib.contextmanager
def exit_if_stuck(seconds: float, message: str) -> Iterator[None]:
    """Run the block; where it has not finished after `seconds`, print `message` and end this process (exit 1).

    For a failed rank waiting on its peers: peers blocked inside a collective
    of the stage never arrive, and cannot be woken; ending this process lets
    the launcher (torchrun, srun --kill-on-bad-exit) stop them.
    """
    def give_up() -> None:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
