"""Job records of submitted stages, and job control on them: Slurm state, logs, cancel, failure marking.

`pipeline.execution` writes `<run_dir>/.jobs/<stage>.json` when it submits a
stage: the executor, the job id (Slurm's, or NeMo-Run's app id for local
runs), the fingerprint it was submitted for, where its logs are and how to
reach the cluster again. `aigc status`, `aigc logs` and `aigc cancel` read
them; Slurm is asked through the same NeMo-Run tunnel (sacct, scancel, cat),
so they work from a login node and over SSH alike.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from datetime import datetime, timezone
from pathlib import Path

from pipeline import manifest as mf
from pipeline.clusters import TunnelConfig
from pipeline.runner import stage_state

JOBS_DIR = ".jobs"
# sacct states of a job that may still run (or run again).
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


class ClusterError(RuntimeError):
    """The cluster refused or failed a command (sbatch, scancel)."""


@dataclasses.dataclass
class JobRecord:
    """One submitted stage: enough to find its job, its logs and its cluster again."""

    stage: str
    executor: str  # "local" or "slurm"
    job_id: str  # Slurm job id; NeMo-Run's app id for local runs
    fingerprint: str  # the stage fingerprint the job was submitted for
    out_dir: str  # the stage's final output directory
    log_dir: str  # the job's directory (on the cluster, for an ssh tunnel)
    experiment: str  # NeMo-Run experiment id
    submitted_at: str = ""
    job_name: str = ""  # Slurm job name (its log files are named after it)
    cluster: str = ""
    tunnel: dict = dataclasses.field(default_factory=dict)  # TunnelConfig fields (slurm)
    sbatch_script: str = ""  # local copy of the submitted sbatch script (slurm)


@dataclasses.dataclass
class SlurmState:
    """A job's state as sacct reports it."""

    job_id: str
    state: str  # e.g. PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, "CANCELLED by 0"
    exit_code: str  # "code:signal"
    started: bool
    elapsed: str
    nodes: str
    unreachable: str = ""  # why the cluster could not be asked (then the state is UNKNOWN)

    @property
    def active(self) -> bool:
        """Return True while the job may still run."""
        return self.state.split()[0] in ACTIVE_STATES

    @property
    def ended_badly(self) -> bool:
        """Return True when the job ran and ended other than COMPLETED."""
        return self.started and not self.active and not self.state.startswith("COMPLETED")


def write_record(run_dir: Path, record: JobRecord) -> None:
    """Write `record` as `<run_dir>/.jobs/<stage>.json` (replacing the stage's previous job)."""
    record.submitted_at = record.submitted_at or datetime.now(timezone.utc).isoformat()
    (Path(run_dir) / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    mf.write_json_atomic(Path(run_dir) / JOBS_DIR / f"{record.stage}.json", dataclasses.asdict(record))


def read_records(run_dir: Path) -> dict[str, JobRecord]:
    """Return stage -> its last JobRecord in `run_dir`."""
    records = {}
    for path in sorted((Path(run_dir) / JOBS_DIR).glob("*.json")):
        record = JobRecord(**json.loads(path.read_text()))
        records[record.stage] = record
    return records


def _tunnel(record: JobRecord):
    from pipeline.slurm_executor import make_tunnel

    return make_tunnel(TunnelConfig(**record.tunnel))


def _on_cluster(record: JobRecord, command: str) -> tuple[int, str]:
    """Run `command` where the record's jobs run; return (exit code, stdout + stderr)."""
    try:
        result = _tunnel(record).run(command, hide=True, warn=True, in_stream=False)
    except Exception as exc:  # an unreachable host, a refused key: report, do not crash status
        return 255, f"{type(exc).__name__}: {exc}"
    return result.return_code, (result.stdout or "") + (result.stderr or "")


def slurm_states(records: dict[str, JobRecord]) -> dict[str, SlurmState]:
    """Return stage -> sacct state of its job, for the Slurm records (one sacct call per cluster)."""
    by_tunnel: dict[str, list[JobRecord]] = {}
    for r in records.values():
        if r.executor == "slurm":
            by_tunnel.setdefault(json.dumps(r.tunnel, sort_keys=True), []).append(r)
    states = {}
    for group in by_tunnel.values():
        ids = ",".join(r.job_id for r in group)
        code, out = _on_cluster(group[0], f"sacct -X -n -P -j {ids} -o JobID,State,ExitCode,Start,Elapsed,NodeList")
        rows = {}
        if code == 0:
            for line in out.splitlines():
                parts = line.split("|")
                if len(parts) == 6:
                    rows[parts[0]] = parts  # a requeued job has several rows: keep the last
        for r in group:
            if r.job_id in rows:
                _, state, exit_code, start, elapsed, nodes = rows[r.job_id]
                states[r.stage] = SlurmState(r.job_id, state, exit_code, start not in ("None", "Unknown", ""),
                                             elapsed, nodes)
            else:
                reason = "not in accounting yet" if code == 0 else " ".join(out.split())[-200:]
                states[r.stage] = SlurmState(r.job_id, f"UNKNOWN ({reason})", "", False, "", "",
                                             "" if code == 0 else reason)
    return states


def job_summary(record: JobRecord, state: SlurmState | None) -> str:
    """Return one line naming the job and, for Slurm, its state and exit code."""
    if record.executor != "slurm":
        return f"{record.executor} {record.job_id}"
    if state is None:
        return f"slurm {record.job_id}"
    text = f"slurm {record.job_id} {state.state}"
    if not state.active and not state.state.startswith(("COMPLETED", "UNKNOWN")):
        text += f" exit {state.exit_code}" if state.started else " (never started)"
    return text


def mark_killed_jobs_failed(run_dir: Path, fingerprints: dict[str, str]) -> list[str]:
    """Write failure.json for stages whose Slurm job ended badly without Python recording it; return them.

    A job killed by Slurm (time limit, scancel, node failure, out of memory)
    leaves no failure record of the runner: this one names the job, its state
    and exit code, so the stage shows as failed. A job that never started
    (cancelled because an upstream job failed) stays 'not run'.
    """
    records = {s: r for s, r in read_records(run_dir).items()
               if r.executor == "slurm" and fingerprints.get(s) == r.fingerprint}
    marked = []
    for stage, state in slurm_states(records).items():
        record = records[stage]
        final = Path(record.out_dir)
        if not state.ended_badly or stage_state(final, record.fingerprint)[0] in ("completed", "failed"):
            continue
        mf.write_json_atomic(final.with_name(final.name + ".tmp") / mf.FAILURE, {
            "stage": stage,
            "fingerprint": record.fingerprint,
            "status": "failed",
            "error": f"Slurm job {state.job_id} ended {state.state} (exit {state.exit_code}) after "
                     f"{state.elapsed} on {state.nodes}; see `aigc logs {stage}`",
            "slurm": dataclasses.asdict(state),
        })
        marked.append(stage)
    return marked


def active_jobs(run_dir: Path, fingerprints: dict[str, str]) -> dict[str, SlurmState]:
    """Return stage -> state of Slurm jobs still queued or running for these stage fingerprints."""
    records = {s: r for s, r in read_records(run_dir).items()
               if r.executor == "slurm" and fingerprints.get(s) == r.fingerprint}
    return {s: st for s, st in slurm_states(records).items() if st.active}


def stage_logs(record: JobRecord) -> str:
    """Return the text of the stage's job logs: the task's output, then (Slurm) the batch script's.

    Raises ClusterError where the cluster cannot be reached.
    """
    if record.executor != "slurm":
        files = sorted(Path(record.log_dir).rglob("combined.log"))
        return "".join(f"==> {f} <==\n{f.read_text(errors='replace')}" for f in files) \
            or f"no log files under {record.log_dir}\n"
    prefix = shlex.quote(f"{record.log_dir}/")
    name = shlex.quote(f"{record.job_name}_{record.job_id}")
    # srun's log of the task (one per requeue), then the batch script's own output
    script = (f'for f in {prefix}log-{name}_*.out {prefix}sbatch_{name}.out; do '
              f'[ -e "$f" ] && printf "==> %s <==\\n" "$f" && cat "$f"; done; true')
    code, out = _on_cluster(record, script)
    if code != 0:  # the script itself always succeeds: the cluster was not reached
        raise ClusterError(f"cannot read the logs of job {record.job_id} ({record.stage}) on cluster "
                           f"{record.cluster or '?'}: {' '.join(out.split())}")
    return out or f"no log files of job {record.job_id} in {record.log_dir} yet\n"


def cancel_jobs(run_dir: Path, stages: list[str] | None = None) -> dict[str, str]:
    """scancel the queued or running Slurm jobs of `stages` (default: all); return stage -> job id cancelled.

    Raises ClusterError where the cluster cannot be reached or scancel fails.
    """
    records = {s: r for s, r in read_records(run_dir).items()
               if r.executor == "slurm" and (not stages or s in stages)}
    states = slurm_states(records)
    unknown = {s: st for s, st in states.items() if st.unreachable}
    if unknown:  # its jobs may still run: say so, never "nothing to cancel"
        stage, state = next(iter(unknown.items()))
        raise ClusterError(f"cannot reach the cluster of job {state.job_id} ({stage}) to cancel it: "
                           f"{state.unreachable}")
    live = {s: st for s, st in states.items() if st.active}
    cancelled = {}
    for stage, state in live.items():
        code, out = _on_cluster(records[stage], f"scancel {shlex.quote(state.job_id)}")
        if code != 0:
            raise ClusterError(f"scancel {state.job_id} ({stage}) failed: {out.strip()}")
        cancelled[stage] = state.job_id
    return cancelled
