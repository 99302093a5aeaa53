"""TEMPORARY GLUE — runs the multimodal recipes' stages under the stage contract.

pipeline.runner.execute_stage only knows the LLM chain (its plan walks
pipeline.stage.STAGE_ORDER and its config JSON only holds chain sections). Until
it takes a stage order/registry, this module does the same job for the stages of
multimodal.stages: fingerprint (same payload as pipeline.runner.stage_fingerprint),
cache check, `<stage>.tmp/` work dir kept for resume, manifest, atomic rename —
reusing pipeline.runner's own work-dir/publish helpers rather than copying them.
Delete it when `pipeline.runner.execute_stage(run_dir, name, configs_json, order=...)` exists.
"""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import manifest as mf
from pipeline.config import RunConfig, apply_overrides, to_dict
from pipeline.runner import REPO_ROOT, _prepare_workdir, _publish, _set_threads
from pipeline.stage import StageContext

from multimodal.stages import PRESETS, STAGES


def resolve_configs(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Return {"run": RunConfig, stage name: config} of every multimodal stage for a preset + overrides."""
    if preset not in PRESETS:
        raise KeyError(f"unknown config {preset!r}; choose from: {', '.join(PRESETS)}")
    configs: dict[str, Any] = {"run": RunConfig()}
    configs.update({name: stage.config_cls() for name, stage in STAGES.items()})
    apply_overrides(configs, PRESETS[preset] + list(overrides or []))
    return configs


def fingerprints(order: tuple[str, ...], configs: dict[str, Any]) -> dict[str, str]:
    """Return stage -> fingerprint for a recipe's stages in order (each includes its inputs')."""
    fps: dict[str, str] = {}
    for name in order:
        stage = STAGES[name]
        fps[name] = mf.fingerprint({
            "stage": name,
            "config": to_dict(configs[name]),
            "seed": configs["run"].seed,
            "inputs": {up: fps[up] for up in stage.inputs},
            "code": mf.code_hash(stage.code, REPO_ROOT),
            "files": [],
        })
    return fps


def execute(run_dir: Path, name: str, configs: dict[str, Any], order: tuple[str, ...]) -> dict:
    """Run stage `name` of the recipe `order` in run_dir unless cached; return its manifest."""
    run_dir = Path(run_dir).resolve()
    fps = fingerprints(order, configs)
    stage = STAGES[name]
    final = run_dir / name
    existing = mf.read_manifest(final)
    if existing and existing.get("status") == "completed" and existing.get("fingerprint") == fps[name]:
        print(f"[aigc] {name}: cached (fingerprint {fps[name]}), nothing to do", flush=True)
        return existing
    inputs = {}
    for up in stage.inputs:
        m = mf.read_manifest(run_dir / up)
        if not m or m.get("status") != "completed" or m.get("fingerprint") != fps[up]:
            raise RuntimeError(f"stage {name!r} needs {up!r} at fingerprint {fps[up]}: run {up!r} first")
        inputs[up] = m
    tmp = final.with_name(name + ".tmp")
    resumed = _prepare_workdir(tmp, fps[name])
    print(f"[aigc] {name}: running (fingerprint {fps[name]}){' — resuming' if resumed else ''}", flush=True)
    run_cfg: RunConfig = configs["run"]
    _set_threads(run_cfg.threads)
    ctx = StageContext(name=name, config=configs[name], run_dir=run_dir, out_dir=tmp, inputs=inputs,
                       threads=run_cfg.threads, seed=run_cfg.seed)
    started = time.time()
    record: dict[str, Any] = {
        "stage": name,
        "fingerprint": fps[name],
        "config": to_dict(configs[name]),
        "run_config": to_dict(run_cfg),
        "inputs": {up: fps[up] for up in stage.inputs},
        "started_at": datetime.now(timezone.utc).isoformat(),
        "versions": mf.library_versions(),
    }
    try:
        result = stage.load_run()(ctx)
        outputs = {role: mf.describe_output(tmp / rel, tmp) for role, rel in result.outputs.items()}
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc()[-4000:], wall_time_s=round(time.time() - started, 3))
        mf.write_json_atomic(tmp / mf.FAILURE, record)
        raise
    record.update(status="completed", outputs=outputs, metrics=result.metrics, resumed=resumed,
                  wall_time_s=round(time.time() - started, 3),
                  finished_at=datetime.now(timezone.utc).isoformat())
    mf.write_json_atomic(tmp / mf.MANIFEST, record)
    _publish(tmp, final)
    print(f"[aigc] {name}: completed in {record['wall_time_s']:.1f}s", flush=True)
    return record


def run_recipe(run_dir: Path, order: tuple[str, ...], configs: dict[str, Any]) -> dict[str, dict]:
    """Run every stage of a recipe in order (cached ones are skipped); return stage -> manifest."""
    return {name: execute(run_dir, name, configs, order) for name in order}
