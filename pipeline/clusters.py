"""Named Slurm cluster profiles: where `aigc run --executor slurm` submits, and with what resources.

A profile file (default `~/.config/aigc/clusters.yaml`, or `--cluster-profile PATH`)
maps cluster names to settings; recipes never name a cluster. Top-level
resource keys are the defaults of every stage's job; `stages:` overrides them
per stage. See `EXAMPLE_PROFILE`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError
from pipeline.stage import get_stage, load_registry

DEFAULT_PROFILE_PATH = Path("~/.config/aigc/clusters.yaml")
LAUNCHERS = ("none", "torchrun", "ray")
PACKAGERS = ("none", "git")
TUNNELS = ("local", "ssh")

EXAMPLE_PROFILE = """\
# ~/.config/aigc/clusters.yaml
my-cluster:
  account: llm_team                   # sbatch --account
  partition: batch
  time: "04:00:00"                    # default time limit of a stage's job
  cpus_per_task: 16
  setup_lines: source /lustre/me/aigc-venv/bin/activate   # run in the sbatch script before srun
  env_vars: {HF_HOME: /lustre/me/hf}
  # container_image: nvcr.io/nvidia/nemo:25.07   # optional (pyxis/enroot); container_mounts: [/lustre:/lustre]
  packager: none                      # none: aigc is installed on the nodes; git: ship the repo's HEAD
  tunnel: {kind: ssh, host: login.my-cluster.org, user: me, job_dir: /lustre/me/aigc-jobs}
  stages:
    curate: {nodes: 2, launcher: ray}             # a Ray cluster across 2 nodes (curate.ray_address=auto)
    pretrain: {nodes: 2, gpus_per_node: 8, time: "24:00:00"}   # torchrun 2 x 8
    sft: {gpus_per_node: 8}
"""


@dataclasses.dataclass
class Resources:
    """What one stage's Slurm job asks for."""

    nodes: int = 1
    ntasks_per_node: int = 1  # processes per node (torchrun: per node, when gpus_per_node is unset)
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "64G"
    time: str = "01:00:00"
    partition: str | None = None
    launcher: str = ""  # "" = the stage's default: torchrun for a multi-rank stage, else "none"


@dataclasses.dataclass
class TunnelConfig:
    """How aigc reaches the cluster: `local` on a login node, or `ssh` from elsewhere."""

    kind: str = "local"
    host: str = ""
    user: str = ""
    job_dir: str = ""  # ssh: the cluster directory that receives experiment dirs and logs
    identity: str = ""  # ssh: private key file (else the ssh agent / password)
    port: int = 22


@dataclasses.dataclass
class ClusterProfile:
    """One named cluster: account, defaults for every job, per-stage overrides, tunnel."""

    name: str
    account: str
    defaults: Resources = dataclasses.field(default_factory=Resources)
    stages: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    qos: str | None = None
    container_image: str | None = None
    container_mounts: list[str] = dataclasses.field(default_factory=list)
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)
    setup_lines: str = ""
    packager: str = "none"
    tunnel: TunnelConfig = dataclasses.field(default_factory=TunnelConfig)

    def resources(self, stage: str) -> Resources:
        """Return the resources of `stage`'s job: the defaults with the stage's overrides."""
        res = dataclasses.replace(self.defaults, **self.stages.get(stage, {}))
        if not res.launcher:
            res.launcher = "torchrun" if stage in load_registry().stages and get_stage(stage).multi_rank else "none"
        return res


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(allowed))}")


def _resources_overrides(data: dict, where: str) -> dict[str, Any]:
    """Return validated Resources overrides from a mapping."""
    _check_keys(data, _field_names(Resources), where)
    if data.get("launcher", "none") not in LAUNCHERS:
        raise ConfigError(f"{where}: launcher {data['launcher']!r}; choose from {', '.join(LAUNCHERS)}")
    for key in ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task"):
        if data.get(key) is not None and (not isinstance(data[key], int) or data[key] < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {data[key]!r}")
    return {k: str(v) if k in ("time", "mem") else v for k, v in data.items()}


def parse_profile(name: str, data: dict) -> ClusterProfile:
    """Return the ClusterProfile `name` from its YAML mapping; raise ConfigError on a bad key or value."""
    where = f"cluster {name!r}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings")
    data = dict(data)
    resource_keys = _field_names(Resources)
    profile_keys = _field_names(ClusterProfile) - {"name", "defaults"}
    _check_keys(data, resource_keys | profile_keys, where)
    if not data.get("account"):
        raise ConfigError(f"{where}: `account` is required (the Slurm account jobs are charged to)")
    defaults = Resources(**_resources_overrides({k: data.pop(k) for k in list(data) if k in resource_keys}, where))
    stages = {}
    for stage, overrides in (data.pop("stages", None) or {}).items():
        if stage not in load_registry().stages:
            raise ConfigError(f"{where}: unknown stage {stage!r}; stages: {', '.join(load_registry().stages)}")
        stages[stage] = _resources_overrides(overrides or {}, f"{where}, stage {stage!r}")
    tunnel_data = data.pop("tunnel", None) or {}
    _check_keys(tunnel_data, _field_names(TunnelConfig), f"{where}, tunnel")
    tunnel = TunnelConfig(**tunnel_data)
    if tunnel.kind not in TUNNELS:
        raise ConfigError(f"{where}: tunnel kind {tunnel.kind!r}; choose from {', '.join(TUNNELS)}")
    if tunnel.kind == "ssh" and not (tunnel.host and tunnel.user and tunnel.job_dir):
        raise ConfigError(f"{where}: an ssh tunnel needs host, user and job_dir")
    if data.get("packager", "none") not in PACKAGERS:
        raise ConfigError(f"{where}: packager {data['packager']!r}; choose from {', '.join(PACKAGERS)}")
    data["env_vars"] = {str(k): str(v) for k, v in (data.get("env_vars") or {}).items()}
    data["container_mounts"] = [str(m) for m in data.get("container_mounts") or []]
    return ClusterProfile(name=name, defaults=defaults, stages=stages, tunnel=tunnel, **data)


def load_profile(path: str | Path | None = None, name: str | None = None) -> ClusterProfile:
    """Return cluster `name` from the profile file at `path` (default DEFAULT_PROFILE_PATH).

    `name` may be left out when the file defines exactly one cluster. Raises ConfigError, one line, where the
    file is missing or not YAML, or names no such cluster (or a bad setting).
    """
    file = Path(path or DEFAULT_PROFILE_PATH).expanduser()
    if not file.is_file():
        raise ConfigError(f"no cluster profile file at {file}: write one (for example `my-cluster: {{account: "
                          "my_account, partition: batch}`; the README's `Running on a Slurm cluster` shows every "
                          "setting), or pass --cluster-profile PATH")
    try:
        clusters = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:  # one line: where and what, not the parser's multi-line report
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(clusters, dict) or not clusters:
        raise ConfigError(f"{file}: expected a mapping of cluster names to settings")
    if name is None:
        if len(clusters) != 1:
            raise ConfigError(f"{file} defines clusters {', '.join(clusters)}: choose one with --cluster NAME")
        name = next(iter(clusters))
    if name not in clusters:
        raise ConfigError(f"{file}: no cluster {name!r}; it defines {', '.join(clusters)}")
    return parse_profile(name, clusters[name])
