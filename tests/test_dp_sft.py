"""The sft stage data-parallel on real torchrun ranks (gloo, one thread each), its checkpoints and exact resume.

Same global batch whatever the world size: DP=2 trains the one-process model
(per-step losses equal to float rounding). A job killed with SIGKILL mid-stage
resumes from its newest checkpoint and ends where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.execution import run_stages, set_world_size
from pipeline.presets import resolve_configs
from tiny_lm import build_model, doc_paragraphs, save_hf, write_corpus_upstream, write_upstream

pytestmark = pytest.mark.slow
REL_TOL = 1e-5
REPO = Path(__file__).resolve().parent.parent
# fp32, no dropout (its masks depend on how rows are spread over ranks), LoRA; 12 steps of 8 chats.
OVERRIDES = ["sft.max_steps=12", "sft.learning_rate=1e-2", "sft.lora_dropout=0.0", "sft.batch_size=8",
             "sft.grad_accum_steps=2", "sft.eval_every=4", "sft.checkpoint_every=3", "sft.max_examples=64"]


def make_run_dir(run_dir: Path, tokenizer, nproc: int) -> Path:
    """Return a run directory whose curate and pretrain stages are completed (tiny corpus and model) for `nproc` ranks."""
    configs = resolve_configs("smoke", OVERRIDES)
    set_world_size(configs, ["sft"], "local", None, nproc)  # pretrain's fingerprint holds its world size
    write_corpus_upstream(run_dir, configs, doc_paragraphs()[:400])
    save_hf(run_dir / "pretrain" / "hf", build_model(tokenizer, positions=64), tokenizer)
    write_upstream(run_dir, configs, "pretrain", {"hf": "hf"})
    return run_dir


def steps(run_dir: Path) -> list[dict]:
    """Return the sft stage's train_log.jsonl records."""
    return [json.loads(line) for line in (run_dir / "sft" / "train_log.jsonl").read_text().splitlines()]


def max_rel_diff(a: list[dict], b: list[dict], key: str) -> float:
    """Return the largest relative difference of `key` between two train logs of the same steps."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    pairs = [(x[key], y[key]) for x, y in zip(a, b) if key in x]
    assert pairs and all(key in y for x, y in zip(a, b) if key in x)
    return max(abs(x - y) / abs(x) for x, y in pairs)


def sft(run_dir: Path, nproc: int, extra: tuple[str, ...] = ()) -> dict:
    """Run the sft stage on `nproc` ranks (NeMo-Run local executor, torchrun); return its manifest."""
    configs = resolve_configs("smoke", [*OVERRIDES, *extra])
    states = run_stages(run_dir, configs, ["sft"], nproc_per_node=nproc, env={"OMP_NUM_THREADS": "1"})
    assert states == {"sft": "completed"}, [p.read_text()[-2000:] for p in (run_dir / "sft.tmp").glob("failure*")]
    return json.loads((run_dir / "sft" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tokenizer) -> Path:
    run_dir = make_run_dir(tmp_path_factory.mktemp("one") / "run", tokenizer, 1)
    sft(run_dir, 1)
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tokenizer) -> Path:
    run_dir = make_run_dir(tmp_path_factory.mktemp("two") / "run", tokenizer, 2)
    manifest = sft(run_dir, 2)
    assert manifest["world_size"] == 2 and manifest["metrics"]["data_parallel"] == 2
    return run_dir


def test_dp2_trains_the_one_rank_model(one_rank, two_ranks):
    one, two = steps(one_rank), steps(two_ranks)
    assert len(one) == 12
    assert max_rel_diff(one, two, "loss") < REL_TOL
    assert max_rel_diff(one, two, "val_loss") < REL_TOL
    assert one[-1]["loss"] < one[0]["loss"] - 0.1  # it learns: equal losses are not trivially equal
    m1 = json.loads((one_rank / "sft" / "manifest.json").read_text())["metrics"]
    m2 = json.loads((two_ranks / "sft" / "manifest.json").read_text())["metrics"]
    assert m1["global_batch_rows"] == m2["global_batch_rows"] == 16 and m1["data_parallel"] == 1


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process it started (the launcher, torchrun, the ranks)."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def kill_when_written(script: str, marker: Path) -> None:
    """Run `script` (python -c, in the repo) and SIGKILL it with its children as soon as `marker` exists.

    Fails where the script ends first (it was never killed mid-stage).
    """
    job = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.is_dir() and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    assert job.poll() is None, "the stage ended before it could be killed"
    kill_tree(job)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_mid_stage_resumes_to_the_uninterrupted_result(tmp_path, tokenizer, one_rank, two_ranks, nproc):
    run_dir = make_run_dir(tmp_path / "run", tokenizer, nproc)
    script = ("import sys; sys.path.insert(0, 'tests'); from test_dp_sft import sft; "
              f"sft(__import__('pathlib').Path({str(run_dir)!r}), {nproc})")
    ckpt = run_dir / "sft.tmp" / "checkpoints"
    kill_when_written(script, ckpt / "step_0000006")
    assert not (run_dir / "sft" / "manifest.json").exists()
    survivors = [p for p in ckpt.iterdir() if p.name.startswith("step_") and not p.name.endswith(".tmp")]
    assert survivors and all((p / "train_state.json").is_file() for p in survivors)  # only complete ones visible

    manifest = sft(run_dir, nproc)  # the same command again
    assert manifest["resumed"] and manifest["metrics"]["resumed_from_step"] >= 6
    reference = steps(one_rank if nproc == 1 else two_ranks)
    resumed = steps(run_dir)
    assert max_rel_diff(reference, resumed, "loss") <= REL_TOL
    assert max_rel_diff(reference, resumed, "val_loss") <= REL_TOL
