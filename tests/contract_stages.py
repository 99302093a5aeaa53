"""A three-stage toy registry (a -> b -> c) used to test the stage contract itself.

Stage `b` counts in steps, checkpointing its progress in its work directory, so a
kill in the middle can be resumed; env TOY_SLEEP_S makes it sleep between steps.
Stage `r` (a -> r, registered but not in the chain) is run by every rank of
a multi-process launch: each writes `rank<N>.txt` and all-reduces its rank (gloo).
`ray_probe_task` runs a stage under the Slurm ray launcher after trying its Ray
cluster without the job's token and with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from pipeline import stage as registry
from pipeline.config import RunConfig
from pipeline.stage import Stage, StageResult


@dataclasses.dataclass
class AConfig:
    text: str = "hello"
    fail: bool = False


@dataclasses.dataclass
class BConfig:
    steps: int = 5


@dataclasses.dataclass
class CConfig:
    suffix: str = "!"


@dataclasses.dataclass
class RConfig:
    fail_rank: int = -1  # this rank raises before the all-reduce: its peers block in it
    fail_rank_late: int = -1  # this rank raises after the all-reduce: every rank reaches the runner's all-gather


def run_a(ctx):
    if ctx.config.fail:
        (ctx.out_dir / "partial.txt").write_text("half")
        raise RuntimeError("planted failure in stage a")
    (ctx.out_dir / "a.txt").write_text(ctx.config.text)
    return StageResult(outputs={"text": "a.txt"}, metrics={"chars": len(ctx.config.text)})


def run_b(ctx):
    text = ctx.input_path("a", "text").read_text()
    ckpt = ctx.out_dir / "ckpt.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "acc": ""}
    started_at = state["step"]
    while state["step"] < ctx.config.steps:
        state["acc"] += text[state["step"] % len(text)]
        state["step"] += 1
        tmp = ckpt.with_suffix(".part")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, ckpt)
        time.sleep(float(os.environ.get("TOY_SLEEP_S", "0")))  # not config: same fingerprint
    (ctx.out_dir / "b.txt").write_text(state["acc"])
    calls = ctx.run_dir / "b_calls.txt"
    with open(calls, "a") as f:
        f.write(f"{started_at}\n")
    return StageResult(outputs={"text": "b.txt"}, metrics={"resumed_from_step": started_at})


def run_c(ctx):
    text = ctx.input_path("b", "text").read_text()
    (ctx.out_dir / "out").mkdir()
    (ctx.out_dir / "out" / "c.txt").write_text(text + ctx.config.suffix)
    return StageResult(outputs={"dir": "out"}, metrics={"chars": len(text) + 1})


def run_r(ctx):
    import torch
    import torch.distributed as dist

    (ctx.out_dir / f"rank{ctx.rank}.txt").write_text(ctx.input_path("a", "text").read_text())
    if ctx.rank == ctx.config.fail_rank:
        raise RuntimeError(f"planted failure on rank {ctx.rank}")
    total = torch.tensor([ctx.rank])
    if dist.is_initialized():
        dist.all_reduce(total)
    if ctx.rank == ctx.config.fail_rank_late:
        raise RuntimeError(f"planted failure on rank {ctx.rank}")
    return StageResult(outputs={"rank0": "rank0.txt"},
                       metrics={"rank_sum": int(total), "world_size": ctx.world_size, "rank": ctx.rank})


STAGES = {
    "a": Stage("a", AConfig, "contract_stages:run_a", code=("tests/contract_stages.py",)),
    "b": Stage("b", BConfig, "contract_stages:run_b", inputs=("a",), code=("tests/contract_stages.py",)),
    "c": Stage("c", CConfig, "contract_stages:run_c", inputs=("b",), code=("tests/contract_stages.py",)),
    "r": Stage("r", RConfig, "contract_stages:run_r", inputs=("a",), code=("tests/contract_stages.py",),
               multi_rank=True),
}


CHAINS = {"llm": ("a", "b", "c")}  # the chain `aigc run` runs


def install() -> None:
    """Point the pipeline's stage registry at these toy stages."""
    registry.install(["contract_stages"])


def configs(**overrides) -> dict:
    """Return a config dict for the toy chain."""
    cfg = {"run": RunConfig(), "a": AConfig(), "b": BConfig(), "c": CConfig(), "r": RConfig()}
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(cfg[section], field, value)
    return cfg


def toy_stage_task(run_dir: str, name: str, configs_json: str, output_dir: str = "") -> None:
    """NeMo-Run task body for the toy chain: install the toy registry, run one stage."""
    install()
    from pipeline.runner import stage_task

    stage_task(run_dir, name, configs_json, output_dir)


STRANGER_JOINS = "import os, ray; ray.init(address=os.environ['RAY_ADDRESS'], log_to_driver=False)"


def ray_probe_task(run_dir: str, name: str, configs_json: str, output_dir: str = "") -> None:
    """NeMo-Run task body under the ray launcher: probe the job's Ray cluster, then run the stage.

    Writes `ray_probe.json` in `run_dir`: the token file's path and mode, what
    a driver without the token got (a child process with no RAY_AUTH_* variable:
    exit code and stderr), and what this task's own driver got.
    """
    import subprocess
    import sys

    import ray

    token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
    stranger_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    stranger = subprocess.run([sys.executable, "-c", STRANGER_JOINS], env=stranger_env,
                              capture_output=True, text=True, timeout=300)
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    ours = ray.get(ray.remote(lambda: "ran").remote())
    ray.shutdown()
    probe = {"token_path": token_path, "token_mode": oct(os.stat(token_path).st_mode & 0o777),
             "stranger_rc": stranger.returncode, "stranger_err": stranger.stderr[-4000:], "ours": ours}
    with open(os.path.join(run_dir, "ray_probe.json"), "w") as f:
        json.dump(probe, f)
    toy_stage_task(run_dir, name, configs_json, output_dir)
