"""NeMo-Run `SlurmExecutor`s built from a cluster profile: one per stage, with its resources and launcher.

Launchers: `none` runs the task once per Slurm task; `torchrun` (NeMo-Run's
Torchrun launcher) starts nodes x processes-per-node ranks with a c10d
rendezvous on the first node; `ray` starts a Ray cluster across the
allocation (head on the first node, one worker per other node; token auth
with a per-job token, no dashboard) and runs the task on the head with
RAY_ADDRESS set.

Every job carries `--kill-on-invalid-dep=yes`: when a whole chain is
submitted at once (afterok dependencies), a failed stage cancels its
downstream jobs instead of leaving them pending forever.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from pipeline.clusters import ClusterProfile, TunnelConfig

JOB_NAME_PREFIX = "aigc."  # NeMo-Run reads the task name after the last dot of the Slurm job name

# One srun task per node. Node 0 starts the Ray head, waits for every node, runs the
# command with RAY_ADDRESS set, then flags the end on the shared job directory so the
# workers leave cleanly. Each node stops only the Ray it started (`ray start --block`
# in the background, then a signal to it), never other Ray instances on the node.
# Token auth: node 0 writes a fresh random token, readable by the job's user only, into
# the job directory (shared with the nodes); the head, the workers and the stage's
# driver all read it through RAY_AUTH_TOKEN_PATH, and node 0 deletes it on exit.
# Clients without it are refused (Unauthenticated / InvalidAuthToken). No dashboard:
# the stage does not use it, so it listens nowhere. Each job has its own GCS and Ray
# client ports (two per job id, so jobs sharing a node never collide).
RAY_TEMPLATE = r"""# aigc ray launcher: a Ray cluster across the allocation; the stage runs on the head node.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
head_ip=$(getent ahostsv4 "$head" | awk 'NR == 1 {print $1}')
port=$(( {{ base_port }} + SLURM_JOB_ID % 1000 * 2 ))
export RAY_ADDRESS="$head_ip:$port"
attempt="${SLURM_JOB_ID}_${SLURM_RESTART_COUNT:-0}"
done_flag="$PWD/.ray_done_$attempt"
unset RAY_AUTH_TOKEN
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$PWD/.ray_token_$attempt"
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
if [ "${SLURM_NODEID:-0}" = "0" ]; then
    trap 'rm -f "$RAY_AUTH_TOKEN_PATH" "$RAY_AUTH_TOKEN_PATH.new"; touch "$done_flag"' EXIT
    (umask 077 && rm -f "$RAY_AUTH_TOKEN_PATH.new" \
        && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH.new" \
        && mv "$RAY_AUTH_TOKEN_PATH.new" "$RAY_AUTH_TOKEN_PATH") || exit 1
    ray start --head --block --node-ip-address="$head_ip" --port="$port" --ray-client-server-port=$((port + 1)) \
        --num-cpus="$cpus" --include-dashboard=false --disable-usage-stats &
    ray_pid=$!
    python - <<'EOF'
import os, time
import ray
deadline = time.time() + {{ join_timeout_s }}
while True:
    try:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        break
    except ConnectionError:
        if time.time() > deadline:
            raise SystemExit("Ray head did not come up")
        time.sleep(2)
want = int(os.environ.get("SLURM_NNODES", "1"))
while sum(node["Alive"] for node in ray.nodes()) < want:
    if time.time() > deadline:
        raise SystemExit(f"only some of the {want} nodes joined the Ray cluster in {{ join_timeout_s }} s")
    time.sleep(2)
print(f"[aigc] Ray cluster up: {want} node(s) at {os.environ['RAY_ADDRESS']}", flush=True)
EOF
    status=$?
    if [ $status -eq 0 ]; then
        {{ command }}
        status=$?
    fi
    kill "$ray_pid"; wait "$ray_pid"
    exit $status
else
    waited=0
    while [ ! -s "$RAY_AUTH_TOKEN_PATH" ] && [ $waited -lt {{ join_timeout_s }} ]; do sleep 2; waited=$((waited + 2)); done
    ray start --block --address="$RAY_ADDRESS" --num-cpus="$cpus" --disable-usage-stats &
    ray_pid=$!
    while [ ! -e "$done_flag" ] && kill -0 "$ray_pid" 2>/dev/null; do sleep 5; done
    kill "$ray_pid" 2>/dev/null; wait "$ray_pid"
    exit 0
fi
"""


def make_tunnel(cfg: TunnelConfig) -> Any:
    """Return the NeMo-Run tunnel for `cfg`: LocalTunnel on a login node, else SSHTunnel."""
    import nemo_run as run

    if cfg.kind == "local":
        return run.LocalTunnel(job_dir="")  # experiment dirs stay under NEMORUN_HOME, shared with the nodes
    return run.SSHTunnel(host=cfg.host, user=cfg.user, job_dir=cfg.job_dir, port=cfg.port,
                         identity=os.path.expanduser(cfg.identity) if cfg.identity else None)


def make_launcher(kind: str) -> Any:
    """Return the NeMo-Run launcher called `kind` (None for `none`)."""
    import nemo_run as run
    from nemo_run.core.execution.launcher import SlurmTemplate

    if kind == "torchrun":
        return run.Torchrun()
    if kind == "ray":
        return SlurmTemplate(template_inline=RAY_TEMPLATE,
                             template_vars={"base_port": 20000, "join_timeout_s": 600})
    return None


def slurm_executor(profile: ClusterProfile, stage: str, env: dict[str, str] | None = None) -> Any:
    """Return the NeMo-Run SlurmExecutor of `stage` on `profile`'s cluster.

    `env` adds environment variables to the profile's; values are exported
    literally (quoted) in the sbatch script.
    """
    import nemo_run as run

    res = profile.resources(stage)
    procs = res.gpus_per_node or res.ntasks_per_node
    env_vars = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **profile.env_vars, **(env or {})}
    return run.SlurmExecutor(
        account=profile.account,
        partition=res.partition,
        qos=profile.qos,
        time=res.time,
        nodes=res.nodes,
        # torchrun: one Slurm task per node running `procs` ranks (NeMo-Run sets ntasks_per_node=1
        # and torchrun's --nproc-per-node from this); ray: one task per node.
        ntasks_per_node=1 if res.launcher == "ray" else procs if res.launcher == "torchrun" else res.ntasks_per_node,
        gpus_per_node=res.gpus_per_node,
        cpus_per_task=res.cpus_per_task,
        mem=res.mem,
        container_image=profile.container_image,
        container_mounts=list(profile.container_mounts),
        env_vars={k: shlex.quote(v) for k, v in env_vars.items()},
        setup_lines=profile.setup_lines or None,
        job_name_prefix=JOB_NAME_PREFIX,
        additional_parameters={"kill_on_invalid_dep": "yes"},
        tunnel=make_tunnel(profile.tunnel),
        packager=run.GitArchivePackager() if profile.packager == "git" else run.Packager(),
        launcher=make_launcher(res.launcher),
    )
