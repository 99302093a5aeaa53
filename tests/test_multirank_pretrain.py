"""Multi-rank pretraining in real torch.distributed worlds (torchrun, gloo, one thread per rank).

Every layout must train the same model as one process: same weights at step 0
(recipes.sharding), same samples per step, same per-token loss, so per-step
losses agree to float rounding. Checkpoints saved on one layout resume on
another; a job killed with SIGKILL resumes to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("multirank_pretrain.py")
REL_TOL = 1e-5
pytestmark = pytest.mark.slow


def torchrun(nproc: int, out: Path, *args: str, timeout: int = 600) -> dict:
    """Run the worker on `nproc` ranks; return what rank 0 wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def max_rel_diff(a: list, b: list) -> float:
    """Return the largest relative difference of two [step, loss] lists of the same steps."""
    assert [s for s, _ in a] == [s for s, _ in b]
    return max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "r.json"
    return torchrun(1, out, "--steps", "20")


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2"), ()], ids=["TP2", "PP2", "DP2"])
def test_two_rank_layouts_train_the_one_rank_model(one_rank, tmp_path, layout):
    run = torchrun(2, tmp_path / "r.json", "--steps", "20", *layout)
    assert len(run["train"]) == 20
    assert max_rel_diff(one_rank["train"], run["train"]) < REL_TOL
    assert max_rel_diff(one_rank["val"], run["val"]) < REL_TOL
    assert max_rel_diff(one_rank["grad_norm"], run["grad_norm"]) < 1e-4
    assert one_rank["train"][-1][1] < one_rank["train"][0][1] - 0.5  # it learns: the test could fail


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2", "--vpp", "2", "--micro-batch", "1")],
                         ids=["TP2xDP2", "PP2(VPP2)xDP2"])
def test_four_rank_layouts_train_the_one_rank_model(one_rank, tmp_path, layout):
    run = torchrun(4, tmp_path / "r.json", "--steps", "20", *layout)
    assert max_rel_diff(one_rank["train"], run["train"]) < REL_TOL
    assert max_rel_diff(one_rank["val"], run["val"]) < REL_TOL


def test_checkpoint_saved_at_tp2_resumes_at_tp1_and_dp2(one_rank, tmp_path):
    saved = tmp_path / "tp2"
    first = torchrun(2, tmp_path / "first.json", "--steps", "20", "--tp", "2", "--stop-after", "10",
                     "--checkpoint-dir", str(saved))
    assert first["train"][-1][0] == 10
    index = json.loads((saved / "step_0000010" / "index.json").read_text())
    assert index["world_size"] == 2 and index["layout"] == {"tp": 2, "pp": 1}
    for nproc, args, name in ((1, (), "tp1"), (2, (), "dp2"), (2, ("--pp", "2"), "pp2")):
        ckpt = tmp_path / name
        shutil.copytree(saved / "step_0000010", ckpt / "step_0000010")
        resumed = torchrun(nproc, tmp_path / f"{name}.json", "--steps", "20", "--checkpoint-dir", str(ckpt), *args)
        assert resumed["resumed_from"] == 10
        assert [s for s, _ in resumed["train"]] == list(range(1, 21))
        assert max_rel_diff(one_rank["train"][10:], resumed["train"][10:]) < REL_TOL, name
        assert max_rel_diff(one_rank["val"], resumed["val"]) < REL_TOL, name


def test_sigkill_of_the_whole_job_resumes_to_the_uninterrupted_result(one_rank, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "killed.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(out), "--steps", "20", "--tp", "2", "--checkpoint-every", "3", "--checkpoint-dir", str(ckpt)]
    job = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (ckpt / "step_0000006").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    job.wait()
    assert not out.exists()
    survivors = sorted(p.name for p in ckpt.iterdir() if not p.name.endswith(".tmp"))
    assert survivors and all((ckpt / s / "index.json").is_file() for s in survivors)  # only complete ones visible
    resumed = torchrun(2, out, "--steps", "20", "--tp", "2", "--checkpoint-every", "3", "--checkpoint-dir", str(ckpt))
    assert resumed["resumed_from"] >= 6
    assert abs(resumed["val"][-1][1] - one_rank["val"][-1][1]) <= 1e-5 * abs(one_rank["val"][-1][1])
    assert len([p for p in ckpt.iterdir() if p.name.startswith("step_")]) == 2  # keep_checkpoints


# --- the pretrain stage on two ranks, launched as users launch it ---------------------------------


@pytest.fixture(scope="module")
def tokenized_run(tmp_path_factory):
    from test_pretrain import write_tokenized

    return write_tokenized(tmp_path_factory.mktemp("tokenize"))


def stage_run(tmp_path: Path, tokenized: Path, nproc: int, overrides: list[str]) -> dict:
    """Run the pretrain stage of the smoke preset on `nproc` torchrun ranks (NeMo-Run); return its manifest."""
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs
    from test_pretrain import layout_run_dir

    configs = resolve_configs("smoke", ["pretrain.global_batch_size=8", *overrides])
    run_dir = layout_run_dir(tmp_path / "run", tokenized, configs)
    states = run_stages(run_dir, configs, ["pretrain"], nproc_per_node=nproc)
    assert states == {"pretrain": "completed"}, (run_dir / "pretrain.tmp").exists() and list(
        (run_dir / "pretrain.tmp").glob("failure*.json"))
    return json.loads((run_dir / "pretrain" / "manifest.json").read_text())


def test_pretrain_stage_on_tp2_and_pp2_ranks_exports_the_one_rank_model(tmp_path, tokenized_run):
    from transformers import LlamaForCausalLM

    one = stage_run(tmp_path / "one", tokenized_run, 1, [])
    for name, nproc, overrides in (("tp2", 2, ["pretrain.tensor_parallel=2"]),
                                   ("pp2", 2, ["pretrain.pipeline_parallel=2"])):
        run = stage_run(tmp_path / name, tokenized_run, nproc, overrides)
        m = run["metrics"]
        assert run["world_size"] == 2 and m["world_size"] == 2 and m["global_batch_size"] == 8
        assert m["layout"] == {"tp2": "TP2 PP1 CP1 DP1", "pp2": "TP1 PP2 CP1 DP1"}[name]
        assert m["hf_logits_max_abs_diff"] <= 1e-4  # export gathered the shards
        assert abs(m["val_loss"] - one["metrics"]["val_loss"]) <= 1e-4 and m["params"] == one["metrics"]["params"]
        hf = LlamaForCausalLM.from_pretrained(tmp_path / name / "run" / "pretrain" / "hf")
        assert sum(p.numel() for p in hf.parameters()) > 0
