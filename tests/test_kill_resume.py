"""Kill anywhere, resume to the same result: each stage SIGKILLed (its whole process group) at a random moment.

For every stage not covered by its own kill test (curate, tokenize: tests/test_curation.py;
pretrain: tests/test_multirank_pretrain.py; sft, align: tests/test_dp_sft.py,
tests/test_dp_align.py), on the `smoke` config: the upstream stages run once; the stage
runs once uninterrupted (the reference) in one run dir, and in a second run dir holding
the same upstream it is killed at a moment drawn uniformly from 10–90 % of the
reference's wall time, then run again by the same command. While killed, no output is
visible (the stage dir is absent, or complete with its manifest); the rerun completes
with the reference's fingerprint and key metrics (durations aside).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json
from pipeline.stage import get_stage, load_registry, upstream_closure

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("AIGC_KILL_SEED", "14"))  # the moments are drawn from it; printed on failure
TIMED = ("_s", "_ms", "per_s", "seconds")


def command(run_dir: Path, stage: str, configs_json: str) -> list[str]:
    """Return the command that runs `stage` of `run_dir` in a child process (what the local executor runs)."""
    return [sys.executable, "-c", "import sys; from pipeline.runner import execute_stage; "
            "execute_stage(sys.argv[1], sys.argv[2], sys.argv[3])", str(run_dir), stage, configs_json]


def run(run_dir: Path, stage: str, configs_json: str) -> float:
    """Run `stage` to its end; return its wall seconds."""
    started = time.monotonic()
    done = subprocess.run(command(run_dir, stage, configs_json), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return time.monotonic() - started


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def comparable(m: dict) -> dict:
    """Return the fingerprint and the key metrics of a manifest, without durations and rates."""
    keys = [k for k in get_stage(m["stage"]).key_metrics if not k.endswith(TIMED)]
    return {"fingerprint": m["fingerprint"], "status": m["status"], **{k: m["metrics"].get(k) for k in keys}}


def kill_at(run_dir: Path, stage: str, configs_json: str, seconds: float) -> bool:
    """Start `stage`, SIGKILL its process group after `seconds`; return True where it was still running."""
    proc = subprocess.Popen(command(run_dir, stage, configs_json), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started (Triton, its stubs)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


def leftovers(run_dir: Path, wait_s: float = 15.0) -> list[str]:
    """Return the command lines of processes still mentioning `run_dir` after up to `wait_s` seconds."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if str(run_dir) in line:
                found.append(line[:200])
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def check_kill_and_resume(tmp_path: Path, upstream_dir: Path, stage: str, configs_json: str, draw: random.Random):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    for target in (reference_dir, killed_dir):
        for name in upstream_closure([stage])[:-1]:
            shutil.copytree(upstream_dir / name, target / name)
    wall = run(reference_dir, stage, configs_json)
    moment = wall * draw.uniform(0.1, 0.9)
    context = f"{stage} killed at {moment:.2f} s of {wall:.2f} s (AIGC_KILL_SEED={SEED})"
    alive = kill_at(killed_dir, stage, configs_json, moment)
    visible = killed_dir / stage
    assert not visible.exists() or (visible / "manifest.json").is_file(), context  # nothing half-written visible
    assert leftovers(killed_dir) == [], context  # nothing it started outlives it (Triton and its stubs)
    run(killed_dir, stage, configs_json)  # the same command again
    assert comparable(manifest(killed_dir, stage)) == comparable(manifest(reference_dir, stage)), context
    assert not (killed_dir / f"{stage}.tmp").exists(), context
    return alive


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Return (one run dir for every chain's upstream stages, run as the tests need them; the smoke configs JSON)."""
    return tmp_path_factory.mktemp("upstream"), configs_to_json(resolve_configs("smoke"))


def run_upstream(upstream_dir: Path, stage: str, configs_json: str) -> None:
    """Run in `upstream_dir` whichever stages upstream of `stage` have not run there."""
    for name in upstream_closure([stage])[:-1]:
        if not (upstream_dir / name / "manifest.json").is_file():
            run(upstream_dir, name, configs_json)


@pytest.mark.parametrize("stage", ["evaluate", "export", "serve"] + list(load_registry().chain("t2i"))
                         + list(load_registry().chain("nerf")))
def test_a_killed_stage_resumes_to_the_uninterrupted_result(upstream, tmp_path, stage):
    upstream_dir, configs_json = upstream
    run_upstream(upstream_dir, stage, configs_json)
    check_kill_and_resume(tmp_path, upstream_dir, stage, configs_json, random.Random(f"{SEED}-{stage}"))


@pytest.mark.parametrize("stage, overrides, first_checkpoint", [
    ("nerf_train", [], "step_0000030"),  # smoke: 60 steps, a checkpoint at each evaluation (every 30)
    ("t2i_train", ["t2i_train.epochs=2"], "step_0000001"),  # a checkpoint after each epoch
])
def test_a_multimodal_stage_killed_after_a_checkpoint_resumes_from_it(upstream, tmp_path, stage, overrides,
                                                                        first_checkpoint):
    upstream_dir, _ = upstream
    configs_json = configs_to_json(resolve_configs("smoke", overrides))
    run_upstream(upstream_dir, stage, configs_json)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    for target in (reference_dir, killed_dir):
        for name in upstream_closure([stage])[:-1]:
            shutil.copytree(upstream_dir / name, target / name)
    run(reference_dir, stage, configs_json)
    marker = killed_dir / f"{stage}.tmp" / "checkpoints" / first_checkpoint
    proc = subprocess.Popen(command(killed_dir, stage, configs_json), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not marker.is_dir() and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the stage ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / stage).exists()
    run(killed_dir, stage, configs_json)
    resumed = manifest(killed_dir, stage)
    assert resumed["resumed"] and comparable(resumed) == comparable(manifest(reference_dir, stage))
    metrics = {k: v for k, v in resumed["metrics"].items() if not k.endswith(TIMED) and k != "curve"}
    assert metrics == {k: v for k, v in manifest(reference_dir, stage)["metrics"].items()
                       if not k.endswith(TIMED) and k != "curve"}
