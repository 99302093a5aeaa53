"""Runs one stage under the stage contract: fingerprint, cache, atomic output, manifest.

`execute_stage` is the function every executor runs (NeMo-Run wraps it in a
`run.Partial`). It is safe to call again after a kill: the work directory
`<stage>.tmp/` is kept when its fingerprint matches, so a stage can resume
from its own checkpoints there; otherwise it is wiped first.

Launched as several processes (torchrun, or srun with more than one task),
every rank runs `execute_stage`; rank 0 alone decides whether the stage is
cached, reads its inputs, prepares and publishes `<stage>.tmp/` and writes the
manifest, and every rank returns (or raises) the same. A failing rank records
itself in `<stage>.tmp/failure.rank<N>.json` at once (its peers may be blocked
in a collective and never report); where every rank reports, rank 0 also writes
`failure.json` naming the failing ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import manifest as mf
from pipeline import ranks as rk
from pipeline.config import RunConfig, from_dict, to_dict
from pipeline.stage import StageContext, StageResult, get_stage, load_registry, upstream_closure

REPO_ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT_FILE = ".fingerprint"
RANK_FAILURES = "failure.rank*.json"  # failure.rank<N>.json: what rank N recorded when it failed
# How long a failed rank waits for its peers' outcomes before it exits (so the launcher stops them).
FAILED_RANK_WAIT_ENV = "AIGC_FAILED_RANK_WAIT_S"
FAILED_RANK_WAIT_S = 30.0


class UpstreamNotReady(RuntimeError):
    """An input stage has not completed at the fingerprint this stage was planned with."""


class RankFailure(RuntimeError):
    """Another rank of a multi-process stage failed, or rank 0 could not run or publish it."""


@dataclasses.dataclass
class PlanItem:
    """One stage of a plan: its fingerprint and whether a completed manifest matches it."""

    name: str
    fingerprint: str
    cached: bool
    inputs: dict[str, str]


def stage_fingerprint(name: str, configs: dict[str, Any], input_fps: dict[str, str]) -> str:
    """Return hash(stage config, seed, input fingerprints, stage code and data, external input files).

    A multi-rank stage's world size enters too: its data-parallel size sets the
    global batch unless the config fixes it.
    """
    stage = get_stage(name)
    code_pkgs = stage.code or (stage.run.split(".")[0],)
    external = [p for f in stage.path_fields for p in getattr(configs[name], f)]
    parts = {
        "stage": name,
        "config": to_dict(configs[name]),
        "seed": configs["run"].seed,
        "inputs": input_fps,
        "code": mf.code_hash(code_pkgs, REPO_ROOT),
        "files": mf.external_files_stamp(external),
    }
    world = configs["run"].ranks_of(name, stage.multi_rank)
    if world > 1:
        parts["world_size"] = world
    return mf.fingerprint(parts)


def stage_dir(run_dir: Path, name: str) -> Path:
    """Return the final output directory of stage `name`."""
    return Path(run_dir) / name


def make_plan(run_dir: Path, configs: dict[str, Any], names: list[str] | None = None) -> list[PlanItem]:
    """Return the plan for `names` (default: the chain `aigc run` runs), upstream first.

    Fingerprints of upstream stages are computed even when they are not in
    `names`, since a stage's fingerprint includes its inputs'.
    """
    wanted = list(names or load_registry().chain())
    fps: dict[str, str] = {}
    plan = []
    for name in upstream_closure(wanted):
        stage = get_stage(name)
        input_fps = {up: fps[up] for up in stage.inputs}
        fps[name] = stage_fingerprint(name, configs, input_fps)
        if name in wanted:
            existing = mf.read_manifest(stage_dir(run_dir, name))
            cached = bool(
                existing
                and existing.get("status") == "completed"
                and existing.get("fingerprint") == fps[name]
            )
            plan.append(PlanItem(name, fps[name], cached, input_fps))
    return plan


def configs_to_json(configs: dict[str, Any]) -> str:
    """Return the JSON form of a pipeline config dict (section -> dataclass)."""
    return json.dumps({k: to_dict(v) for k, v in configs.items()}, sort_keys=True)


def configs_from_json(text: str) -> dict[str, Any]:
    """Return section -> dataclass from `configs_to_json` output (every registered stage's section in it)."""
    data = json.loads(text)
    configs: dict[str, Any] = {"run": from_dict(RunConfig, data.get("run", {}))}
    for name, stage in load_registry().stages.items():
        if name in data:
            configs[name] = from_dict(stage.config_cls, data[name])
    return configs


def _read_inputs(run_dir: Path, name: str, expected: dict[str, str]) -> dict[str, dict]:
    """Return upstream manifests, checking each is completed and is the one planned."""
    inputs = {}
    for up, fp in expected.items():
        m = mf.read_manifest(stage_dir(run_dir, up))
        if not m or m.get("status") != "completed":
            raise UpstreamNotReady(f"stage {name!r} needs {up!r}, which has not completed in {run_dir}")
        if m["fingerprint"] != fp:
            raise UpstreamNotReady(
                f"stage {name!r} needs {up!r} with fingerprint {fp}, found {m['fingerprint']}: run {up!r} first"
            )
        inputs[up] = m
    return inputs


def _prepare_workdir(tmp: Path, fp: str) -> bool:
    """Create or reuse `tmp`; return True where it holds resumable work of this fingerprint."""
    marker = tmp / FINGERPRINT_FILE
    if tmp.exists():
        if marker.is_file() and marker.read_text().strip() == fp:
            for failure in (tmp / mf.FAILURE, *tmp.glob(RANK_FAILURES)):
                failure.unlink(missing_ok=True)
            return True
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    marker.write_text(fp + "\n")
    return False


def _publish(tmp: Path, final: Path) -> None:
    """Atomically replace `final` with the finished `tmp` directory."""
    (tmp / FINGERPRINT_FILE).unlink(missing_ok=True)
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@dataclasses.dataclass
class _Start:
    """What the one process (or rank 0) found before running a stage."""

    cached: dict | None  # the completed manifest of this fingerprint, where there is one
    inputs: dict[str, dict]
    resumed: bool


def _start(run_path: Path, name: str, item: PlanItem, final: Path) -> _Start:
    """Return the cached manifest, else the inputs, after preparing the work directory."""
    existing = mf.read_manifest(final)
    if existing and existing.get("status") == "completed" and existing.get("fingerprint") == item.fingerprint:
        return _Start(cached=existing, inputs={}, resumed=False)
    inputs = _read_inputs(run_path, name, item.inputs)
    return _Start(cached=None, inputs=inputs, resumed=_prepare_workdir(_workdir(final), item.fingerprint))


def _workdir(final: Path) -> Path:
    """Return the work directory `<stage>.tmp/` of the output directory `final`."""
    return final.with_name(final.name + ".tmp")


def _base_record(name: str, item: PlanItem, configs: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Return the fields every manifest and failure record of this run of the stage shares."""
    return {
        "stage": name,
        "fingerprint": item.fingerprint,
        "config": to_dict(configs[name]),
        "run_config": to_dict(configs["run"]),
        "inputs": item.inputs,
        "world_size": world_size,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "versions": mf.library_versions(),
    }


def _error_fields(exc: BaseException) -> dict[str, str]:
    """Return the error line and traceback tail of the exception being handled."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}


def _complete(record: dict[str, Any], result: StageResult, outputs: dict[str, Any], resumed: bool,
              started: float, tmp: Path, final: Path) -> dict[str, Any]:
    """Write the manifest of a finished stage into `tmp`, publish `tmp` as `final`; return the manifest."""
    record.update(
        status="completed",
        outputs=outputs,
        metrics=result.metrics,
        resumed=resumed,
        wall_time_s=round(time.time() - started, 3),
        finished_at=datetime.now(timezone.utc).isoformat(),
    )
    mf.write_json_atomic(tmp / mf.MANIFEST, record)
    _publish(tmp, final)
    print(f"[aigc] {record['stage']}: completed in {record['wall_time_s']:.1f}s", flush=True)
    return record


def _describe_outputs(result: StageResult, tmp: Path) -> dict[str, Any]:
    """Return role -> description (path, sha256, bytes) of the outputs a stage returned."""
    return {role: mf.describe_output(tmp / rel, tmp) for role, rel in result.outputs.items()}


def _announce(name: str, item: PlanItem, tmp: Path, resumed: bool, world_size: int) -> None:
    """Print the line that says the stage is running (and on how many ranks, from where it resumes)."""
    ranks = f" on {world_size} ranks" if world_size > 1 else ""
    print(
        f"[aigc] {name}: running{ranks} (fingerprint {item.fingerprint})"
        f"{' — resuming from ' + str(tmp) if resumed else ''}",
        flush=True,
    )


def execute_stage(run_dir: str, name: str, configs_json: str, output_dir: str = "") -> dict:
    """Run stage `name` of the run in `run_dir` unless cached; return its manifest.

    `output_dir` overrides where the stage's outputs go (default `<run_dir>/<name>`),
    for one-off stage commands such as `aigc curate --output DIR`. Under a
    multi-process launch (pipeline.ranks) every rank calls this and gets the
    same manifest, or raises.
    """
    run_path = Path(run_dir).resolve()
    configs = configs_from_json(configs_json)
    (item,) = make_plan(run_path, configs, [name])
    final = Path(output_dir).resolve() if output_dir else stage_dir(run_path, name)
    ranks = rk.ranks_from_env()
    planned = configs["run"].ranks_of(name, get_stage(name).multi_rank)
    if ranks.world_size == planned == 1:
        return _execute_alone(run_path, name, item, final, configs)
    if get_stage(name).multi_rank and ranks.world_size != planned:
        raise RuntimeError(f"stage {name!r} was planned for {planned} rank(s) (world_size) but launched as "
                           f"{ranks.world_size}: launch it as planned")
    if not get_stage(name).multi_rank:
        raise RuntimeError(f"stage {name!r} runs as one process, but it was launched as {ranks.world_size} "
                           "ranks: launch it with one task (only multi-rank stages, e.g. pretrain, take more)")
    created = rk.init_distributed(ranks)
    try:
        return _execute_ranked(run_path, name, item, final, configs, ranks)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _execute_alone(run_path: Path, name: str, item: PlanItem, final: Path, configs: dict[str, Any]) -> dict:
    """Run the stage in this one process; return its manifest."""
    start = _start(run_path, name, item, final)
    if start.cached:
        print(f"[aigc] {name}: cached (fingerprint {item.fingerprint}), nothing to do", flush=True)
        return start.cached
    tmp = _workdir(final)
    _announce(name, item, tmp, start.resumed, 1)
    run_cfg: RunConfig = configs["run"]
    _set_threads(run_cfg.threads)
    ctx = StageContext(name=name, config=configs[name], run_dir=run_path, out_dir=tmp, inputs=start.inputs,
                       threads=run_cfg.threads, seed=run_cfg.seed)
    started = time.time()
    record = _base_record(name, item, configs, 1)
    try:
        result = get_stage(name).load_run()(ctx)
        outputs = _describe_outputs(result, tmp)
    except BaseException as exc:
        record.update(status="failed", **_error_fields(exc), wall_time_s=round(time.time() - started, 3))
        mf.write_json_atomic(tmp / mf.FAILURE, record)
        raise
    return _complete(record, result, outputs, start.resumed, started, tmp, final)


def _execute_ranked(run_path: Path, name: str, item: PlanItem, final: Path, configs: dict[str, Any],
                    ranks: rk.Ranks) -> dict:
    """Run the stage as this rank of `ranks.world_size`; return the manifest rank 0 published."""
    group = rk.runner_group()
    tmp = _workdir(final)
    if ranks.is_main:
        try:
            start = _start(run_path, name, item, final)
        except Exception as exc:
            rk.broadcast_from_main({"error": f"{type(exc).__name__}: {exc}",
                                    "upstream": isinstance(exc, UpstreamNotReady)}, group)
            raise
        rk.broadcast_from_main(dataclasses.asdict(start), group)
    else:
        decision = rk.broadcast_from_main(None, group)
        if "error" in decision:
            raise (UpstreamNotReady if decision["upstream"] else RankFailure)(f"rank 0: {decision['error']}")
        start = _Start(**decision)
    if start.cached:
        if ranks.is_main:
            print(f"[aigc] {name}: cached (fingerprint {item.fingerprint}), nothing to do", flush=True)
        return start.cached
    if ranks.is_main:
        _announce(name, item, tmp, start.resumed, ranks.world_size)
    run_cfg: RunConfig = configs["run"]
    _set_threads(run_cfg.threads)
    ctx = StageContext(name=name, config=configs[name], run_dir=run_path, out_dir=tmp, inputs=start.inputs,
                       threads=run_cfg.threads, seed=run_cfg.seed, rank=ranks.rank,
                       world_size=ranks.world_size, local_rank=ranks.local_rank)
    started = time.time()
    record = _base_record(name, item, configs, ranks.world_size)
    failure: BaseException | None = None
    try:
        result = get_stage(name).load_run()(ctx)
        outcome = {"ok": True}
    except BaseException as exc:
        failure = exc
        outcome = _record_rank_failure(exc, record, ranks.rank, started, tmp)
    outcomes = _all_gather_outcomes(outcome, failure, group, f"[aigc] {name}: rank {ranks.rank}")
    failed = {r: out for r, out in enumerate(outcomes) if not out["ok"]}
    if failed:
        if ranks.is_main:
            _write_failure(record, failed, started, tmp)
        if failure is not None:
            raise failure
        raise RankFailure(f"stage {name!r} failed on rank(s) {', '.join(map(str, failed))}: "
                          f"{failed[min(failed)]['error']}")
    if not ranks.is_main:
        reply = rk.broadcast_from_main(None, group)
        if "error" in reply:
            raise RankFailure(f"rank 0 could not complete stage {name!r}: {reply['error']}")
        return reply["record"]
    try:
        record = _complete(record, result, _describe_outputs(result, tmp), start.resumed, started, tmp, final)
    except Exception as exc:
        error = {"ok": False, **_error_fields(exc)}
        error["error"] = f"rank 0: {error['error']}"
        _write_failure(record, {0: error}, started, tmp)
        rk.broadcast_from_main({"error": error["error"]}, group)
        raise
    rk.broadcast_from_main({"record": record}, group)
    return record


def _record_rank_failure(exc: BaseException, record: dict[str, Any], rank: int, started: float,
                         tmp: Path) -> dict[str, Any]:
    """Write this rank's failure to `failure.rank<N>.json`; return its outcome for the other ranks.

    Written at once, before any collective: peers blocked in a collective of
    the stage never reach the all-gather, and the launcher then stops the
    whole group, so this file may be the only record of the failure.
    """
    outcome = {"ok": False, **_error_fields(exc)}
    outcome["error"] = f"rank {rank}: {outcome['error']}"
    mf.write_json_atomic(tmp / f"failure.rank{rank}.json", dict(
        record, status="failed", rank=rank, error=outcome["error"], traceback=outcome["traceback"],
        wall_time_s=round(time.time() - started, 3), finished_at=datetime.now(timezone.utc).isoformat()))
    return outcome


def _all_gather_outcomes(outcome: dict[str, Any], failure: BaseException | None, group: Any,
                         who: str) -> list[dict]:
    """Return every rank's outcome of the stage function, in rank order.

    A failed rank waits at most FAILED_RANK_WAIT_S (env AIGC_FAILED_RANK_WAIT_S)
    for its peers, then exits so the launcher stops them; where a peer has
    already gone, it re-raises its own failure.
    """
    if failure is None:
        return rk.all_gather(outcome, group)
    wait_s = float(os.environ.get(FAILED_RANK_WAIT_ENV, FAILED_RANK_WAIT_S))
    message = f"{who} failed and the other ranks did not report within {wait_s:g} s: exiting so the launcher stops them"
    try:
        with rk.exit_if_stuck(wait_s, message):
            return rk.all_gather(outcome, group)
    except Exception:
        raise failure from None


def _write_failure(record: dict[str, Any], failed: dict[int, dict], started: float, tmp: Path) -> None:
    """Write `failure.json` naming the failed ranks (field rank: the first; ranks: rank -> error)."""
    first = min(failed)
    others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    mf.write_json_atomic(tmp / mf.FAILURE, dict(
        record, status="failed", rank=first, ranks={str(r): out["error"] for r, out in failed.items()},
        error=failed[first]["error"] + others, traceback=failed[first]["traceback"],
        wall_time_s=round(time.time() - started, 3)))


def stage_task(run_dir: str, name: str, configs_json: str, output_dir: str = "") -> None:
    """NeMo-Run task body: `execute_stage`, exiting with one clear line when an input is missing."""
    try:
        execute_stage(run_dir, name, configs_json, output_dir)
    except UpstreamNotReady as exc:
        print(f"[aigc] {name}: not run: {exc}", flush=True)
        raise SystemExit(3) from None


def _set_threads(threads: int) -> None:
    """Pin torch (if imported later) and BLAS pools to `threads` threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def stage_state(final: Path, fingerprint: str) -> tuple[str, dict | None]:
    """Return (state, record) of a stage dir for a planned fingerprint.

    state is 'completed' (manifest matches), 'failed' (the last attempt at this
    fingerprint failed: failure.json, else the first failure.rank<N>.json of a
    multi-process run, its record naming every rank that failed), 'stale' (a completed manifest of other inputs/config),
    or 'not run'.
    """
    done = mf.read_manifest(final)
    if done and done.get("status") == "completed" and done.get("fingerprint") == fingerprint:
        return "completed", done
    tmp = _workdir(final)
    failure = tmp / mf.FAILURE
    if failure.is_file():
        record = json.loads(failure.read_text())
        if record.get("fingerprint") == fingerprint:
            return "failed", record
    rank_failures = [r for r in (json.loads(p.read_text()) for p in sorted(tmp.glob(RANK_FAILURES)))
                     if r.get("fingerprint") == fingerprint]
    if rank_failures:  # a rank failed while its peers were blocked: the launcher stopped them
        first = min(rank_failures, key=lambda r: datetime.fromisoformat(r["finished_at"]))
        return "failed", dict(first, ranks={str(r["rank"]): r["error"] for r in rank_failures})
    if done:
        return "stale", done
    return "not run", None


def stage_states(run_dir: Path, names: list[str], fingerprints: dict[str, str]) -> dict[str, tuple[str, dict | None]]:
    """Return name -> (state, record) of each stage, what `aigc status` and `aigc report` show.

    A stage with a planned fingerprint is judged against it (`stage_state`); one without (no saved
    run config) by its manifest alone: its recorded status, or 'not run' where it has none.
    """
    states: dict[str, tuple[str, dict | None]] = {}
    for name in names:
        final = stage_dir(run_dir, name)
        if name in fingerprints:
            states[name] = stage_state(final, fingerprints[name])
        else:
            record = mf.read_manifest(final)
            states[name] = (record.get("status", "unknown"), record) if record else ("not run", None)
    return states
