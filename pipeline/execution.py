"""Runs planned stages as NeMo-Run tasks: one `run.Partial` per stage in one `run.Experiment`.

The executor is chosen here, at launch, from its name; recipes never name one.
`local` runs the stages one after another on this machine; with
`nproc_per_node` N > 1 the multi-rank stages (`Stage.multi_rank`: pretrain, sft, align)
run as N torchrun ranks here (rendezvous on localhost, a free port; gloo on
CPU), the others as one process. `slurm` submits
every stage at once, each as its own job with the resources its cluster
profile gives it (pipeline.clusters), chained by NeMo-Run with `afterok` job
dependencies; a failed job cancels the jobs downstream of it.

Experiment metadata and per-stage logs land in `<run_dir>/.nemo_run/`; the job
of each stage is recorded in `<run_dir>/.jobs/<stage>.json` (pipeline.jobs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from pipeline import jobs
from pipeline.clusters import ClusterProfile
from pipeline.config import ConfigError
from pipeline.runner import configs_to_json, make_plan, stage_dir, stage_state
from pipeline.stage import get_stage, upstream_closure

EXECUTORS = ("local", "slurm")


def make_executor(name: str, stage: str = "", profile: ClusterProfile | None = None,
                  env: dict[str, str] | None = None, nproc_per_node: int = 1) -> Any:
    """Return the NeMo-Run executor called `name` for `stage` (slurm: from the cluster `profile`).

    local: a multi-rank stage with `nproc_per_node` > 1 runs as that many
    torchrun ranks; NeMo-Run then starts `torchrun --nnodes 1
    --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint localhost:0` (port 0:
    a free one). Any other stage runs as one process.
    """
    import nemo_run as run

    if name == "local":
        if nproc_per_node > 1 and get_stage(stage).multi_rank:
            return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun", env_vars=dict(env or {}))
        return run.LocalExecutor(env_vars=dict(env or {}))
    if name == "slurm":
        if profile is None:
            raise ConfigError("the slurm executor needs a cluster profile (--cluster / --cluster-profile)")
        from pipeline.slurm_executor import slurm_executor

        return slurm_executor(profile, stage, env)
    raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")


def _use_nemo_run_home(run_dir: Path) -> None:
    """Point NeMo-Run's home (experiment metadata, logs) at `<run_dir>/.nemo_run`."""
    os.environ["NEMORUN_HOME"] = str(run_dir / ".nemo_run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from nemo_run.config import set_nemorun_home

    set_nemorun_home(os.environ["NEMORUN_HOME"])


def set_world_size(configs: dict[str, Any], names: list[str], executor: str, profile: ClusterProfile | None,
                   nproc_per_node: int) -> int:
    """Set the ranks the multi-rank stages of `names` (and upstream) run as; return the largest.

    local: `configs["run"].world_size` = `nproc_per_node` for all of them;
    slurm: `configs["run"].stage_ranks` = each one's processes from the cluster
    profile (nodes x GPUs or tasks per node), which may differ per stage.
    """
    multi = [n for n in upstream_closure(names) if get_stage(n).multi_rank]
    if executor == "slurm" and profile is not None:
        sizes = {n: slurm_processes(profile, n) for n in multi}
        configs["run"].world_size = 1
        configs["run"].stage_ranks = tuple(f"{n}={size}" for n, size in sizes.items() if size > 1)
        return max(sizes.values(), default=1)
    configs["run"].world_size = nproc_per_node
    return nproc_per_node


def slurm_processes(profile: ClusterProfile, name: str) -> int:
    """Return how many processes stage `name`'s Slurm job starts: nodes x (GPUs or tasks) per node."""
    res = profile.resources(name)
    if res.launcher == "ray":  # a Ray cluster across the nodes; the stage runs once, on the head
        return 1
    per_node = (res.gpus_per_node or res.ntasks_per_node) if res.launcher == "torchrun" else res.ntasks_per_node
    return res.nodes * per_node


def _check_launchers(configs: dict[str, Any], names: list[str], profile: ClusterProfile) -> None:
    """Raise ConfigError where a stage would start its own local Ray under the ray launcher, or where a
    one-process stage would run as several processes."""
    for name in names:
        if slurm_processes(profile, name) > 1 and not get_stage(name).multi_rank:
            raise ConfigError(f"stage {name!r} runs as one process, but cluster {profile.name!r} gives its job "
                              f"{slurm_processes(profile, name)}: set its ntasks_per_node (and nodes) to 1, or "
                              "gpus_per_node with launcher none")
        if profile.resources(name).launcher == "ray" and getattr(configs.get(name), "ray_address", None) == "":
            raise ConfigError(f"stage {name!r} runs under the ray launcher of cluster {profile.name!r}, which "
                              f"starts a Ray cluster across its nodes: set {name}.ray_address=auto to use it")


def _build_experiment(exp: Any, run_dir: Path, configs: dict[str, Any], names: list[str], executor: str,
                      profile: ClusterProfile | None, output_dir: str, task: Callable,
                      env: dict[str, str] | None) -> None:
    """Add one task per stage to the experiment `exp`, each launched as the ranks it is planned for."""
    import nemo_run as run

    blob = configs_to_json(configs)
    for name in names:
        partial = run.Partial(task, run_dir=str(run_dir), name=name, configs_json=blob, output_dir=output_dir)
        ranks = configs["run"].ranks_of(name, get_stage(name).multi_rank)  # local only: Slurm's come from the profile
        exp.add(partial, executor=make_executor(executor, name, profile, env, ranks), name=name, tail_logs=True)


def _record_jobs(exp: Any, run_dir: Path, plan: dict[str, Any], executor: str,
                 profile: ClusterProfile | None, final_dirs: dict[str, Path]) -> None:
    """Write the job record of every launched task of `exp`."""
    import dataclasses

    for job in exp.jobs:
        if not job.handle:
            continue
        ex = job.executor
        record = jobs.JobRecord(
            stage=job.id, executor=executor, job_id=job.handle.rsplit("/", 1)[-1],
            fingerprint=plan[job.id].fingerprint, out_dir=str(final_dirs[job.id]),
            log_dir=ex.job_dir, experiment=ex.experiment_id,
        )
        if executor == "slurm":
            record.log_dir = os.path.join(ex.tunnel.job_dir, Path(ex.job_dir).name)
            record.job_name = ex.job_details.job_name
            record.cluster = profile.name
            record.tunnel = dataclasses.asdict(profile.tunnel)
            record.sbatch_script = os.path.join(ex.experiment_dir, f"{ex.job_name}_sbatch.sh")
        jobs.write_record(run_dir, record)


def _tunnel_text(profile: ClusterProfile | None) -> str:
    """Return how aigc reaches the cluster of `profile`, for a message: `ssh user@host:port` or `local tunnel`."""
    if profile is None or profile.tunnel.kind != "ssh":
        return "local tunnel"
    return f"ssh {profile.tunnel.user}@{profile.tunnel.host}:{profile.tunnel.port}"


def _cluster_error(command: str, exit_code: int, stderr: str, profile: ClusterProfile | None) -> jobs.ClusterError:
    """Return the ClusterError, one line, of a cluster command (sbatch, mkdir) that failed."""
    program = command.split()[0] if command.split() else command
    if exit_code == 127:  # the shell found no such program: not a Slurm login node
        return jobs.ClusterError(f"cannot submit to cluster {profile.name if profile else '?'!r}: {program!r} is not "
                                 f"found there ({_tunnel_text(profile)}); run aigc on a Slurm login node "
                                 "(tunnel kind local) or reach one with an ssh tunnel")
    return jobs.ClusterError(f"{command!r} failed (exit {exit_code}): {'; '.join(stderr.strip().splitlines())}")


def run_stages(run_dir: Path, configs: dict[str, Any], names: list[str], executor: str = "local",
               output_dir: str = "", task: Callable | None = None, profile: ClusterProfile | None = None,
               detach: bool = False, env: dict[str, str] | None = None,
               nproc_per_node: int = 1) -> dict[str, str]:
    """Run `names` in order as NeMo-Run tasks; return stage -> 'completed' | 'failed' | 'not run' | 'submitted'.

    local: stages run one after another; a stage whose upstream failed stops at
    once with a message naming the upstream stage. slurm: all stages are
    submitted at once with afterok dependencies; unless `detach`, this waits for
    them (and marks a stage whose job Slurm killed as failed); with `detach` it
    returns after submission ('submitted'). `task` is the task body (default
    `pipeline.runner.stage_task`); `env` adds environment variables to the tasks.
    `nproc_per_node` (local only) runs the torchrun stages as that many ranks
    here; on Slurm the cluster profile decides. Raises jobs.ClusterError, one
    line, where the cluster cannot be reached or refuses a job.
    """
    if nproc_per_node < 1 or (nproc_per_node > 1 and executor != "local"):
        raise ConfigError(f"nproc_per_node={nproc_per_node}: a positive number of ranks, for the local executor; "
                          "on Slurm set ntasks_per_node / gpus_per_node in the cluster profile")
    set_world_size(configs, names, executor, profile, nproc_per_node)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _use_nemo_run_home(run_dir)
    import nemo_run as run
    from invoke.exceptions import UnexpectedExit
    from paramiko import SSHException

    from pipeline.runner import stage_task

    plan = {p.name: p for p in make_plan(run_dir, configs, names)}
    fingerprints = {n: plan[n].fingerprint for n in names}
    if executor == "slurm" and profile is not None:
        _check_launchers(configs, names, profile)
        busy = jobs.active_jobs(run_dir, fingerprints)
        if busy:
            listed = ", ".join(f"{s} (job {st.job_id} {st.state})" for s, st in busy.items())
            raise ConfigError(f"already submitted and not finished: {listed}; wait, or `aigc cancel`")
    final_dirs = {n: Path(output_dir).resolve() if output_dir else stage_dir(run_dir, n) for n in names}
    with run.Experiment("aigc", log_level="WARN", enable_goodbye_message=False) as exp:
        _build_experiment(exp, run_dir, configs, names, executor, profile, output_dir, task or stage_task, env)
        try:
            exp.run(sequential=True, detach=detach and executor == "slurm", tail_logs=True)
        except UnexpectedExit as exc:  # sbatch refused a job: say why, on one line, without the traceback
            raise _cluster_error(exc.result.command, exc.result.exited, exc.result.stderr, profile) from None
        except (OSError, SSHException) as exc:  # the ssh tunnel could not connect
            if executor != "slurm" or profile.tunnel.kind != "ssh":
                raise
            raise jobs.ClusterError(f"cannot reach cluster {profile.name!r} ({_tunnel_text(profile)}): "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
        finally:
            _record_jobs(exp, run_dir, plan, executor, profile, final_dirs)  # the jobs that were submitted
    if executor == "slurm":
        if detach:
            return {n: "submitted" for n in names}
        jobs.mark_killed_jobs_failed(run_dir, fingerprints)
    return {n: stage_state(final_dirs[n], plan[n].fingerprint)[0] for n in names}


def sbatch_scripts(run_dir: Path, configs: dict[str, Any], names: list[str], profile: ClusterProfile,
                   task: Callable | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """Return stage -> the sbatch script NeMo-Run would submit for it (+ its launcher script); submit nothing.

    The scripts come from NeMo-Run's own dry run (its experiment directory is
    removed afterwards). At submission each job also gets
    `--dependency=afterok:<job id of the stage before it>`.
    """
    run_dir = Path(run_dir).resolve()
    _use_nemo_run_home(run_dir)
    import nemo_run as run

    from pipeline.runner import stage_task

    scripts = {}
    with run.Experiment("aigc", log_level="WARN", enable_goodbye_message=False) as exp:
        _build_experiment(exp, run_dir, configs, names, "slurm", profile, "", task or stage_task, env)
        exp.dryrun(log=False, delete_exp_dir=False)
        for job in exp.jobs:
            ex = job.executor
            text = Path(ex.experiment_dir, f"{ex.job_name}_sbatch.sh").read_text()
            for launcher_script in sorted(Path(ex.job_dir, "scripts").glob("*.sh")):  # e.g. the ray launcher's
                text += f"\n# ---- {launcher_script} (run by srun above) ----\n{launcher_script.read_text()}"
            scripts[job.id] = text
        shutil.rmtree(exp.jobs[0].executor.experiment_dir, ignore_errors=True)
    return scripts
