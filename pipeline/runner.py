"""Runs one stage under the stage contract: fingerprint, cache, atomic output, manifest.

`execute_stage` is the function every executor runs (NeMo-Run wraps it in a
`run.Partial`). It is safe to call again after a kill: the work directory
`<stage>.tmp/` is kept when its fingerprint matches, so a stage can resume
from its own checkpoints there; otherwise it is wiped first.
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
from pipeline.config import RunConfig, from_dict, to_dict
from pipeline import stage as registry
from pipeline.stage import StageContext, get_stage

REPO_ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT_FILE = ".fingerprint"


class UpstreamNotReady(RuntimeError):
    """An input stage has not completed at the fingerprint this stage was planned with."""


@dataclasses.dataclass
class PlanItem:
    """One stage of a plan: its fingerprint and whether a completed manifest matches it."""

    name: str
    fingerprint: str
    cached: bool
    inputs: dict[str, str]


def stage_fingerprint(name: str, configs: dict[str, Any], input_fps: dict[str, str]) -> str:
    """Return hash(stage config, seed, input fingerprints, stage code and data, external input files)."""
    stage = get_stage(name)
    code_pkgs = stage.code or (stage.run.split(".")[0],)
    external = [p for f in stage.path_fields for p in getattr(configs[name], f)]
    return mf.fingerprint(
        {
            "stage": name,
            "config": to_dict(configs[name]),
            "seed": configs["run"].seed,
            "inputs": input_fps,
            "code": mf.code_hash(code_pkgs, REPO_ROOT),
            "files": mf.external_files_stamp(external),
        }
    )


def stage_dir(run_dir: Path, name: str) -> Path:
    """Return the final output directory of stage `name`."""
    return Path(run_dir) / name


def make_plan(run_dir: Path, configs: dict[str, Any], names: list[str] | None = None) -> list[PlanItem]:
    """Return the plan for `names` (default: the LLM chain), upstream first.

    Fingerprints of upstream stages are computed even when they are not in
    `names`, since a stage's fingerprint includes its inputs'.
    """
    wanted = list(names or registry.STAGE_ORDER)
    fps: dict[str, str] = {}
    plan = []
    for name in registry.upstream_closure(wanted):
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
    """Return section -> dataclass from `configs_to_json` output."""
    data = json.loads(text)
    configs: dict[str, Any] = {"run": from_dict(RunConfig, data.get("run", {}))}
    for name in registry.STAGE_MODULES:
        if name in data:
            configs[name] = from_dict(get_stage(name).config_cls, data[name])
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
            (tmp / mf.FAILURE).unlink(missing_ok=True)
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


def execute_stage(run_dir: str, name: str, configs_json: str, output_dir: str = "") -> dict:
    """Run stage `name` of the run in `run_dir` unless cached; return its manifest.

    `output_dir` overrides where the stage's outputs go (default `<run_dir>/<name>`),
    for one-off stage commands such as `aigc curate --output DIR`.
    """
    run_path = Path(run_dir).resolve()
    configs = configs_from_json(configs_json)
    run_cfg: RunConfig = configs["run"]
    item = next(p for p in make_plan(run_path, configs) if p.name == name)
    final = Path(output_dir).resolve() if output_dir else stage_dir(run_path, name)
    existing = mf.read_manifest(final)
    if existing and existing.get("status") == "completed" and existing.get("fingerprint") == item.fingerprint:
        print(f"[aigc] {name}: cached (fingerprint {item.fingerprint}), nothing to do", flush=True)
        return existing

    stage = get_stage(name)
    inputs = _read_inputs(run_path, name, item.inputs)
    tmp = final.with_name(final.name + ".tmp")
    resumed = _prepare_workdir(tmp, item.fingerprint)
    print(
        f"[aigc] {name}: running (fingerprint {item.fingerprint}){' — resuming from ' + str(tmp) if resumed else ''}",
        flush=True,
    )
    _set_threads(run_cfg.threads)
    ctx = StageContext(
        name=name,
        config=configs[name],
        run_dir=run_path,
        out_dir=tmp,
        inputs=inputs,
        threads=run_cfg.threads,
        seed=run_cfg.seed,
    )
    started = time.time()
    record: dict[str, Any] = {
        "stage": name,
        "fingerprint": item.fingerprint,
        "config": to_dict(configs[name]),
        "run_config": to_dict(run_cfg),
        "inputs": item.inputs,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "versions": mf.library_versions(),
    }
    try:
        result = stage.load_run()(ctx)
        outputs = {role: mf.describe_output(tmp / rel, tmp) for role, rel in result.outputs.items()}
    except BaseException as exc:
        record.update(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc()[-4000:],
            wall_time_s=round(time.time() - started, 3),
        )
        mf.write_json_atomic(tmp / mf.FAILURE, record)
        raise
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
    print(f"[aigc] {name}: completed in {record['wall_time_s']:.1f}s", flush=True)
    return record


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
    fingerprint failed), 'stale' (a completed manifest of other inputs/config),
    or 'not run'.
    """
    done = mf.read_manifest(final)
    if done and done.get("status") == "completed" and done.get("fingerprint") == fingerprint:
        return "completed", done
    failure = final.with_name(final.name + ".tmp") / mf.FAILURE
    if failure.is_file():
        record = json.loads(failure.read_text())
        if record.get("fingerprint") == fingerprint:
            return "failed", record
    if done:
        return "stale", done
    return "not run", None
