"""Stages on Slurm through NeMo-Run's SlurmExecutor, against a real one-node cluster on loopback.

Tests marked `slurm` need the cluster of tests/slurm_cluster.sh (install, then
start) and are skipped with the reason when it is absent or down; each submits
toy stages (tests/contract_stages.py) as real jobs, 20-80 s on a busy 2-core
machine, hence also `slow`. The others check cluster profiles and the
generated sbatch scripts as text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

import contract_stages
from pipeline import cli, jobs
from pipeline import stage as registry
from pipeline.clusters import load_profile, parse_profile
from pipeline.config import ConfigError
from pipeline.execution import run_stages, sbatch_scripts, set_world_size
from pipeline.presets import resolve_configs
from pipeline.runner import execute_stage, configs_to_json, make_plan

TESTS_DIR = Path(__file__).resolve().parent
CLUSTER_SCRIPT = TESTS_DIR / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm_cluster():
    """Skip unless the loopback cluster answers: Slurm client present, daemons up, accounting reachable."""
    if shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed (sinfo not found): run `bash tests/slurm_cluster.sh install`")
    try:
        status = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("`tests/slurm_cluster.sh status` did not answer in 60 s")
    if status.returncode != 0:
        pytest.skip(f"the loopback Slurm cluster is down: run `bash tests/slurm_cluster.sh start`\n{status.stdout[-800:]}")


@pytest.fixture(autouse=True)
def stdin_from_devnull(monkeypatch):
    """NeMo-Run runs sbatch, sacct and mkdir through `invoke`, which reads stdin: pytest's refuses reads."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr("sys.stdin", devnull)
        yield


@pytest.fixture
def toy(monkeypatch):
    """Install the toy a -> b -> c registry here; the Slurm children install it through toy_stage_task."""
    monkeypatch.setattr(registry, "_active", registry._active)  # the real registry comes back after the test
    contract_stages.install()
    return contract_stages


def loopback_profile(**stages):
    """Return the profile of the loopback cluster; the children find the toy stages on PYTHONPATH."""
    return parse_profile("loopback", {
        "account": "aigc", "partition": "debug", "time": "00:10:00",
        "env_vars": {"PYTHONPATH": str(TESTS_DIR)},
        "stages": stages,
    })


def comparable(manifest: dict) -> dict:
    """Return the parts of a manifest that do not depend on when or where it ran."""
    return {k: manifest[k] for k in ("stage", "status", "fingerprint", "config", "run_config", "inputs",
                                     "outputs", "metrics")}


def read_manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


# ---- profiles and sbatch scripts (no cluster needed) ----

def test_profile_file_defaults_stage_overrides_and_errors(tmp_path):
    path = tmp_path / "clusters.yaml"
    path.write_text(
        "eos:\n"
        "  account: llm\n"
        "  partition: batch\n"
        "  time: '04:00:00'\n"
        "  tunnel: {kind: ssh, host: login.eos, user: me, job_dir: /lustre/me/jobs}\n"
        "  stages:\n"
        "    pretrain: {nodes: 2, gpus_per_node: 8, time: '24:00:00'}\n"
        "    curate: {nodes: 4, launcher: ray}\n"
    )
    profile = load_profile(path)  # the only cluster in the file
    assert profile.name == "eos" and profile.tunnel.kind == "ssh"
    pre = profile.resources("pretrain")
    assert (pre.nodes, pre.gpus_per_node, pre.time, pre.partition, pre.launcher) == (2, 8, "24:00:00", "batch", "torchrun")
    assert profile.resources("curate").launcher == "ray"
    assert profile.resources("tokenize").launcher == "none" and profile.resources("tokenize").time == "04:00:00"

    with pytest.raises(ConfigError, match="gpus_per_node"):  # the error lists the valid keys
        parse_profile("x", {"account": "a", "gpus": 8})
    with pytest.raises(ConfigError, match="unknown stage 'pretrian'"):
        parse_profile("x", {"account": "a", "stages": {"pretrian": {"nodes": 2}}})
    with pytest.raises(ConfigError, match="needs host, user and job_dir"):
        parse_profile("x", {"account": "a", "tunnel": {"kind": "ssh", "host": "h"}})
    with pytest.raises(ConfigError, match="no cluster 'dgx'"):
        load_profile(path, "dgx")
    with pytest.raises(ConfigError, match="example"):
        load_profile(tmp_path / "missing.yaml")


def test_sbatch_script_of_a_multinode_gpu_training_stage(tmp_path):
    profile = parse_profile("dgx", {
        "account": "llm_team", "partition": "batch", "time": "04:00:00",
        "container_image": "nvcr.io/nvidia/nemo:25.07", "container_mounts": ["/lustre:/lustre"],
        "env_vars": {"HF_HOME": "/lustre/hf cache"},
        "stages": {"pretrain": {"nodes": 2, "gpus_per_node": 8, "time": "24:00:00"}},
    })
    configs = resolve_configs("tiny", [])
    script = sbatch_scripts(tmp_path / "run", configs, ["pretrain"], profile)["pretrain"]
    lines = script.splitlines()
    for flag in ("--account=llm_team", "--partition=batch", "--nodes=2", "--gpus-per-node=8",
                 "--ntasks-per-node=1", "--time=24:00:00", "--job-name=aigc.pretrain", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "export HF_HOME='/lustre/hf cache'" in lines  # exported literally, quoted
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "--container-image nvcr.io/nvidia/nemo:25.07" in srun and "/lustre:/lustre" in srun
    torchrun = srun[srun.index("torchrun"):].split()
    arg = {torchrun[i]: torchrun[i + 1] for i in range(1, len(torchrun) - 1) if torchrun[i].startswith("--")}
    assert arg["--nnodes"] == "2" and arg["--nproc-per-node"] == "8"
    assert arg["--rdzv-backend"] == "c10d" and arg["--rdzv-endpoint"].startswith("$head_node_ip:")
    assert arg["--node-rank"] == "$SLURM_NODEID"
    assert torchrun[-4:-1] == ["nemo_run.core.runners.fdl_runner", "-n", "pretrain"]
    assert "--kill-on-bad-exit=1" in srun.split()  # NeMo-Run's own: a failing task ends the others
    assert not list((tmp_path / "run" / ".nemo_run" / "experiments" / "aigc").glob("aigc_*"))  # nothing left


def test_ray_launcher_needs_the_stage_to_join_its_cluster(tmp_path):
    # The real curate stage would start its own local Ray unless told to join the allocation's.
    profile = parse_profile("c", {"account": "a", "stages": {"curate": {"nodes": 2, "launcher": "ray"}}})
    with pytest.raises(ConfigError, match="curate.ray_address=auto"):
        run_stages(tmp_path, resolve_configs("tiny", []), ["curate"], executor="slurm", profile=profile)


def test_ray_launcher_script(tmp_path, toy):
    profile = loopback_profile(a={"nodes": 3, "launcher": "ray"})
    script = sbatch_scripts(tmp_path, toy.configs(), ["a"], profile, task=toy.toy_stage_task)["a"]
    assert "#SBATCH --nodes=3" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "ray start --head --block" in script and 'ray start --block --address="$RAY_ADDRESS"' in script
    assert "python -m nemo_run.core.runners.fdl_runner -n a" in script
    # token auth with a fresh token per job, private to its user, removed at the end; no dashboard
    assert "RAY_AUTH_MODE=disabled" not in script and "export RAY_AUTH_MODE=token" in script
    assert 'export RAY_AUTH_TOKEN_PATH="$PWD/.ray_token_' in script and "unset RAY_AUTH_TOKEN\n" in script
    assert "(umask 077 && " in script and "secrets.token_hex(32)" in script
    assert 'trap \'rm -f "$RAY_AUTH_TOKEN_PATH"' in script and "--include-dashboard=false" in script


# ---- against the loopback cluster ----

@pytest.mark.slurm
@pytest.mark.slow
def test_stage_on_slurm_matches_a_local_run(slurm_cluster, toy, tmp_path):
    cfg = toy.configs()
    local = tmp_path / "local"
    for name in ("a", "b"):
        execute_stage(str(local), name, configs_to_json(cfg))

    remote = tmp_path / "slurm"
    states = run_stages(remote, cfg, ["a", "b"], executor="slurm", task=toy.toy_stage_task,
                        profile=loopback_profile(b={"launcher": "torchrun"}))
    assert states == {"a": "completed", "b": "completed"}
    for name in ("a", "b"):
        assert comparable(read_manifest(remote, name)) == comparable(read_manifest(local, name))

    records = jobs.read_records(remote)
    slurm = jobs.slurm_states(records)
    assert {s: st.state for s, st in slurm.items()} == {"a": "COMPLETED", "b": "COMPLETED"}
    assert int(records["b"].job_id) > int(records["a"].job_id)
    log = jobs.stage_logs(records["b"])
    assert "[aigc] b: completed" in log and "torch/distributed/run.py" in log  # b ran under torchrun
    assert "--dependency" not in Path(records["b"].sbatch_script).read_text()  # given on sbatch's command line


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_stage_on_slurm_is_failed_with_its_log(slurm_cluster, toy, tmp_path, capsys):
    states = run_stages(tmp_path, toy.configs(a__fail=True), ["a", "b"], executor="slurm",
                        task=toy.toy_stage_task, profile=loopback_profile())
    assert states == {"a": "failed", "b": "not run"}
    failure = json.loads((tmp_path / "a.tmp" / "failure.json").read_text())
    assert "planted failure" in failure["error"]
    records = jobs.read_records(tmp_path)
    slurm = jobs.slurm_states(records)
    assert slurm["a"].state == "FAILED" and slurm["a"].exit_code == "1:0"
    assert slurm["b"].state.startswith("CANCELLED") and not slurm["b"].started  # afterok never satisfied
    assert jobs.job_summary(records["b"], slurm["b"]).endswith("(never started)")
    log = jobs.stage_logs(records["a"])
    assert "RuntimeError: planted failure in stage a" in log and "job exited with code 1" in log

    # What `aigc status` and `aigc logs a` print.
    console = Console(width=200, record=True)
    console.print(cli._status_table(tmp_path, toy.configs(a__fail=True), ["a", "b"]))
    table = console.export_text()
    assert f"slurm {records['a'].job_id} FAILED exit 1:0" in table and "planted failure" in table
    assert cli.cmd_logs(tmp_path, "a") == 0
    assert "RuntimeError: planted failure in stage a" in capsys.readouterr().out


@pytest.mark.slurm
@pytest.mark.slow
def test_killed_job_is_failed_and_a_rerun_resubmits_only_the_unfinished_stages(slurm_cluster, toy, tmp_path):
    cfg, names = toy.configs(), ["a", "b", "c"]
    profile = loopback_profile()
    states = run_stages(tmp_path, cfg, names, executor="slurm", task=toy.toy_stage_task, profile=profile,
                        detach=True, env={"TOY_SLEEP_S": "4"})
    assert states == {n: "submitted" for n in names}
    first = jobs.read_records(tmp_path)
    ckpt = tmp_path / "b.tmp" / "ckpt.json"
    deadline = time.time() + 180
    while not (ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 1):  # b is running, mid-way
        assert time.time() < deadline, "stage b did not start on the cluster in 180 s"
        time.sleep(1)
    fps = {p.name: p.fingerprint for p in make_plan(tmp_path, cfg, names)}
    with pytest.raises(ConfigError, match="already submitted"):
        run_stages(tmp_path, cfg, ["b", "c"], executor="slurm", task=toy.toy_stage_task, profile=profile)

    assert jobs.cancel_jobs(tmp_path, ["b"]) == {"b": first["b"].job_id}
    deadline = time.time() + 60
    while jobs.active_jobs(tmp_path, fps):
        assert time.time() < deadline, "the cancelled jobs did not end in 60 s"
        time.sleep(1)
    assert jobs.mark_killed_jobs_failed(tmp_path, fps) == ["b"]
    failure = json.loads((tmp_path / "b.tmp" / "failure.json").read_text())
    assert f"Slurm job {first['b'].job_id} ended CANCELLED" in failure["error"]

    plan = make_plan(tmp_path, cfg, names)
    todo = [p.name for p in plan if not p.cached]
    assert todo == ["b", "c"]
    assert run_stages(tmp_path, cfg, todo, executor="slurm", task=toy.toy_stage_task, profile=profile) == \
        {"b": "completed", "c": "completed"}
    again = jobs.read_records(tmp_path)
    assert again["a"].job_id == first["a"].job_id  # a was not resubmitted
    assert again["b"].job_id != first["b"].job_id and again["c"].job_id != first["c"].job_id
    starts = [int(x) for x in (tmp_path / "b_calls.txt").read_text().split()]
    assert starts and starts[-1] >= 1  # b resumed from the checkpoint of its killed job
    assert (tmp_path / "c" / "out" / "c.txt").read_text() == "hello!"


@pytest.mark.slurm
@pytest.mark.slow
def test_stage_runs_as_the_tasks_of_its_job(slurm_cluster, toy, monkeypatch, tmp_path):
    # srun starts 2 tasks (launcher none): each finds its rank in SLURM_PROCID and the rendezvous from Slurm.
    cfg = toy.configs()
    execute_stage(str(tmp_path), "a", configs_to_json(cfg))
    states = run_stages(tmp_path, cfg, ["r"], executor="slurm", task=toy.toy_stage_task,
                        profile=loopback_profile(r={"ntasks_per_node": 2, "launcher": "none"}))
    assert states == {"r": "completed"}
    manifest = read_manifest(tmp_path, "r")
    assert manifest["world_size"] == 2 and manifest["metrics"]["rank_sum"] == 1
    assert sorted(p.name for p in (tmp_path / "r").glob("rank*.txt")) == ["rank0.txt", "rank1.txt"]
    record = jobs.read_records(tmp_path)["r"]
    assert "#SBATCH --ntasks-per-node=2" in Path(record.sbatch_script).read_text()
    assert jobs.stage_logs(record).count("[aigc] r: completed") == 1  # rank 0 alone publishes


@pytest.mark.slurm
@pytest.mark.slow
def test_ray_launcher_starts_a_ray_cluster_for_the_stage(slurm_cluster, toy, tmp_path):
    # The job's Ray refuses a driver without its token and accepts the stage's; the token is private and goes.
    states = run_stages(tmp_path, toy.configs(), ["a"], executor="slurm", task=toy.ray_probe_task,
                        profile=loopback_profile(a={"launcher": "ray"}))
    log = jobs.stage_logs(jobs.read_records(tmp_path)["a"])
    assert states == {"a": "completed"}, log[-3000:]
    assert "[aigc] Ray cluster up: 1 node(s)" in log and "[aigc] a: completed" in log
    probe = json.loads((tmp_path / "ray_probe.json").read_text())
    assert probe["stranger_rc"] != 0 and "InvalidAuthToken" in probe["stranger_err"], probe
    assert probe["ours"] == "ran" and probe["token_mode"] == "0o600"
    assert not os.path.exists(probe["token_path"])  # deleted when the job ended


@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_stage_runs_as_two_tensor_parallel_ranks_of_one_job(slurm_cluster, tmp_path):
    # The real training stage, not a toy: one Slurm task running torchrun with 2 ranks (TP 2, gloo).
    from test_pretrain import layout_run_dir, write_tokenized

    configs = resolve_configs("smoke", ["pretrain.tensor_parallel=2", "pretrain.max_steps=6",
                                        "pretrain.eval_every=3"])
    run_dir = layout_run_dir(tmp_path / "run", write_tokenized(tmp_path / "tokenized"), configs)
    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:10:00",
                                         "stages": {"pretrain": {"ntasks_per_node": 2}}})
    assert profile.resources("pretrain").launcher == "torchrun"  # the default of a multi-rank stage
    states = run_stages(run_dir, configs, ["pretrain"], executor="slurm", profile=profile)
    assert states == {"pretrain": "completed"}, jobs.stage_logs(jobs.read_records(run_dir)["pretrain"])[-3000:]
    manifest = read_manifest(run_dir, "pretrain")
    assert manifest["world_size"] == 2 and manifest["metrics"]["layout"] == "TP2 PP1 CP1 DP1"
    assert manifest["metrics"]["hf_logits_max_abs_diff"] <= 1e-4


def test_one_process_stage_is_refused_more_processes(tmp_path):
    profile = parse_profile("c", {"account": "a", "stages": {"evaluate": {"gpus_per_node": 8, "launcher": "torchrun"}}})
    with pytest.raises(ConfigError, match="'evaluate' runs as one process"):
        run_stages(tmp_path, resolve_configs("smoke"), ["evaluate"], executor="slurm", profile=profile)


def test_multi_rank_stages_get_their_own_ranks_from_the_cluster_profile():
    profile = parse_profile("c", {"account": "a", "stages": {"pretrain": {"nodes": 2, "gpus_per_node": 8},
                                                               "sft": {"gpus_per_node": 4}}})
    configs = resolve_configs("smoke")
    assert set_world_size(configs, ["align"], "slurm", profile, 1) == 16
    assert configs["run"].stage_ranks == ("pretrain=16", "sft=4")  # align: one GPU, one process
    assert [configs["run"].ranks_of(n, True) for n in ("pretrain", "sft", "align")] == [16, 4, 1]
    assert configs["run"].ranks_of("evaluate", False) == 1


def untimed(manifest: dict) -> dict:
    """Return comparable(manifest) without the metrics that are durations or rates (they differ run to run)."""
    timed = ("_s", "_ms", "per_s", "seconds")
    out = comparable(manifest)
    out["metrics"] = {k: v for k, v in out["metrics"].items() if not k.endswith(timed) and k != "curve"}
    timed_files = ("quality.json", "curve.json", "psnr_curve.png")  # they record or plot seconds
    out["outputs"] = {k: {**v, "sha256": None, "bytes": None} if v["path"] in timed_files else v
                      for k, v in out["outputs"].items()}
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_multimodal_recipes_on_slurm_match_a_local_run(slurm_cluster, tmp_path):
    # Both multimodal chains (t2i: data -> vae -> train; nerf: data -> train) through the same runner as the LLM
    # stages: a Slurm job per stage (afterok) here, the LocalExecutor there; the same fingerprints, outputs and
    # metrics (durations aside; the NeRF curve holds its timings).
    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:20:00"})
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "local"
    configs = resolve_configs("smoke")
    names = list(registry.load_registry().chain("t2i") + registry.load_registry().chain("nerf"))
    states = run_stages(slurm_dir, configs, names, executor="slurm", profile=profile)
    records = jobs.read_records(slurm_dir)
    assert set(states.values()) == {"completed"}, {n: jobs.stage_logs(records[n])[-2000:] for n in records}
    assert run_stages(local_dir, configs, names) == dict.fromkeys(names, "completed")
    plan = {p.name: p.fingerprint for p in make_plan(local_dir, configs, names)}
    for name in names:
        on_slurm, here = read_manifest(slurm_dir, name), read_manifest(local_dir, name)
        assert untimed(on_slurm) == untimed(here), name
        assert on_slurm["fingerprint"] == plan[name] and records[name].executor == "slurm"
    curves = [[point[3:] for point in read_manifest(d, "nerf_train")["metrics"]["curve"]] for d in (slurm_dir, local_dir)]
    assert curves[0] == curves[1]  # held-out PSNR/SSIM at each evaluation
