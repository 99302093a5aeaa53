"""Rank-aware stages: a stage launched as several processes (torchrun, srun) prepares, fails and publishes once.

The toy stage `r` (tests/contract_stages.py) writes one file per rank and
all-reduces the ranks over gloo. The tests marked `slow` start real processes:
2 torchrun ranks through NeMo-Run's LocalExecutor, or 2 plain processes joined
through torch's env:// rendezvous.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import contract_stages
from pipeline import cli
from pipeline import stage as registry
from pipeline.config import ConfigError
from pipeline.execution import make_executor, run_stages
from pipeline.ranks import Ranks, ranks_from_env
from pipeline.runner import configs_to_json, execute_stage, make_plan, stage_state

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture
def toy(monkeypatch):
    """Install the toy registry here and in child processes (PYTHONPATH); `r` (multi-rank) runs under torchrun."""
    monkeypatch.setattr(registry, "_active", registry._active)  # the real registry comes back after the test
    monkeypatch.setenv("PYTHONPATH", f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    contract_stages.install()
    return contract_stages


def state_of_r(run_dir: Path, cfg: dict) -> tuple[str, dict | None]:
    return stage_state(run_dir / "r", make_plan(run_dir, cfg, ["r"])[0].fingerprint)


# ---- where a process stands (no processes started) ----

def test_ranks_from_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS": "2"}
    assert ranks_from_env(env) == Ranks(rank=3, world_size=8, local_rank=1)  # torchrun's own variables win
    assert not ranks_from_env(env).is_main and Ranks().is_main
    assert ranks_from_env({}) == Ranks(0, 1, 0)


def test_ranks_from_srun_env_set_the_rendezvous():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu1,gpu2",
           "SLURM_STEP_NODELIST": "gpu1,gpu2"}
    assert ranks_from_env(env) == Ranks(rank=3, world_size=4, local_rank=1)
    assert {k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")} == {
        "MASTER_ADDR": "gpu1", "MASTER_PORT": str(20000 + 123456 % 20000), "RANK": "3", "WORLD_SIZE": "4",
        "LOCAL_RANK": "1"}

    kept = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "5", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "4242"}
    assert ranks_from_env(kept) == Ranks(0, 2, 0)
    assert (kept["MASTER_ADDR"], kept["MASTER_PORT"]) == ("10.0.0.9", "4242")  # set ones are kept

    # The batch script itself (no job step) has SLURM_PROCID=0 and the job's task count: one process.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1",
             "SLURM_JOB_NODELIST": "n1"}
    assert ranks_from_env(batch) == Ranks(0, 1, 0) and "MASTER_ADDR" not in batch


@pytest.mark.skipif(subprocess.run(["which", "scontrol"], capture_output=True).returncode != 0,
                    reason="scontrol (Slurm client) is not installed")
def test_ranks_from_srun_env_expand_a_node_range():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9",
           "SLURM_STEP_NODELIST": "node[03-04]", "SLURM_JOB_NODELIST": "node[01-04]"}
    ranks_from_env(env)
    assert env["MASTER_ADDR"] == "node03"


def test_a_run_dir_remembers_its_world_size(tmp_path):
    assert cli._saved_world_size(tmp_path) == 1
    (tmp_path / cli.RUN_CONFIG_FILE).write_text(json.dumps({"config": "smoke", "overrides": ["world_size=2"]}))
    assert cli._saved_world_size(tmp_path) == 2


def test_nproc_per_node_option_and_executors():
    args = cli.build_parser().parse_args(["pretrain", "--nproc-per-node", "2"])
    assert args.nproc_per_node == 2
    assert cli.build_parser().parse_args(["run"]).nproc_per_node is None  # the run dir's last, else 1
    ranked = make_executor("local", "pretrain", nproc_per_node=2)
    assert ranked.ntasks_per_node == 2 and ranked.launcher == "torchrun"
    single = make_executor("local", "tokenize", nproc_per_node=2)  # not a torchrun stage: one process
    assert single.ntasks_per_node == 1 and single.launcher is None
    with pytest.raises(ConfigError, match="cluster profile"):
        run_stages(Path("unused"), {}, ["pretrain"], executor="slurm", nproc_per_node=2)


# ---- 2 torchrun ranks through NeMo-Run's LocalExecutor ----

@pytest.mark.slow
def test_torchrun_ranks_fail_together_then_complete(toy, tmp_path):
    ok = toy.configs()
    execute_stage(str(tmp_path), "a", configs_to_json(ok))

    # Rank 1 fails before the all-reduce that rank 0 waits in: it records itself and exits, torchrun stops rank 0.
    bad = toy.configs(r__fail_rank=1)
    assert run_stages(tmp_path, bad, ["r"], task=toy.toy_stage_task, nproc_per_node=2,
                      env={"AIGC_FAILED_RANK_WAIT_S": "2"}) == {"r": "failed"}
    assert not (tmp_path / "r").exists()
    state, record = state_of_r(tmp_path, bad)
    assert state == "failed" and record["rank"] == 1
    assert record["error"] == "rank 1: RuntimeError: planted failure on rank 1"
    assert (tmp_path / "r.tmp" / "failure.rank1.json").is_file()

    # The re-run without the planted failure completes on both ranks.
    assert run_stages(tmp_path, ok, ["r"], task=toy.toy_stage_task, nproc_per_node=2) == {"r": "completed"}
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["metrics"]["rank_sum"] == 0 + 1
    assert manifest["metrics"]["rank"] == 0  # the outputs and metrics are rank 0's
    assert sorted(p.name for p in (tmp_path / "r").glob("rank*.txt")) == ["rank0.txt", "rank1.txt"]
    assert not (tmp_path / "r.tmp").exists()


# ---- 2 plain processes (env:// rendezvous): who writes what ----

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import contract_stages
    from pipeline import manifest, runner
    contract_stages.install()
    rank, calls = sys.argv[3], open(sys.argv[4], "w")

    def spy(fn, what):
        def wrapper(*args):
            calls.write(what(*args) + "\\n")
            calls.flush()
            return fn(*args)
        return wrapper

    runner._publish = spy(runner._publish, lambda tmp, final: f"publish {final.name}")
    manifest.write_json_atomic = spy(manifest.write_json_atomic, lambda path, data: f"write {path.name}")
    try:
        result = {"manifest": runner.execute_stage(sys.argv[1], "r", sys.argv[2])}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(run_dir: Path, cfg: dict, calls_dir: Path) -> dict[int, dict]:
    """Run stage r as 2 processes joined by env:// rendezvous; return rank -> its result; log its writes."""
    cfg["run"].world_size = 2  # what run_stages / the CLI plan a 2-rank launch with
    port, procs = str(free_port()), {}
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs[rank] = subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(run_dir), configs_to_json(cfg), str(rank),
             str(calls_dir / f"calls.rank{rank}.txt")], env=env, stdout=subprocess.PIPE, text=True)
    results = {}
    for rank, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        results[rank] = json.loads(out.split("RESULT ", 1)[1])
    return results


@pytest.mark.slow
def test_only_rank_0_writes_the_manifest_and_publishes(toy, tmp_path):
    cfg = toy.configs()
    run_dir = tmp_path / "ok"
    execute_stage(str(run_dir), "a", configs_to_json(cfg))
    results = run_two_ranks(run_dir, cfg, tmp_path)
    assert results[0]["manifest"] == results[1]["manifest"]  # every rank returns what rank 0 published
    assert results[0]["manifest"]["world_size"] == 2 and results[0]["manifest"]["metrics"]["rank_sum"] == 1
    assert (tmp_path / "calls.rank0.txt").read_text().splitlines() == ["write manifest.json", "publish r"]
    assert (tmp_path / "calls.rank1.txt").read_text() == ""


@pytest.mark.slow
def test_a_late_failure_is_reported_by_every_rank_and_recorded_by_rank_0(toy, tmp_path):
    cfg = toy.configs(r__fail_rank_late=1)
    execute_stage(str(tmp_path), "a", configs_to_json(cfg))
    results = run_two_ranks(tmp_path, cfg, tmp_path)
    assert results[1] == {"error": "RuntimeError: planted failure on rank 1"}
    assert results[0]["error"].startswith("RankFailure: stage 'r' failed on rank(s) 1: rank 1: RuntimeError")
    assert not (tmp_path / "r").exists()
    assert (tmp_path / "calls.rank0.txt").read_text().splitlines() == ["write failure.json"]
    assert (tmp_path / "calls.rank1.txt").read_text().splitlines() == ["write failure.rank1.json"]
    state, record = state_of_r(tmp_path, cfg)
    assert state == "failed" and record["rank"] == 1 and record["world_size"] == 2
    assert record["ranks"] == {"1": "rank 1: RuntimeError: planted failure on rank 1"}
    assert "planted failure on rank 1" in record["traceback"]


def test_a_multi_rank_stage_launched_otherwise_than_planned_is_refused(toy, tmp_path):
    cfg = toy.configs()
    execute_stage(str(tmp_path), "a", configs_to_json(cfg))
    cfg["run"].world_size = 2  # planned for 2 ranks, run as this one process
    with pytest.raises(RuntimeError, match="planned for 2 rank"):
        execute_stage(str(tmp_path), "r", configs_to_json(cfg))
    assert make_plan(tmp_path, cfg, ["r"])[0].fingerprint != make_plan(tmp_path, toy.configs(), ["r"])[0].fingerprint
    assert make_plan(tmp_path, cfg, ["a"])[0].fingerprint == make_plan(tmp_path, toy.configs(), ["a"])[0].fingerprint
