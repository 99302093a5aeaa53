"""The align stage data-parallel on real torchrun ranks (gloo, one thread each), its checkpoints and exact resume.

DPO (and the reward model before it) at DP=2 train the one-process models:
per-step losses equal to float rounding. PPO and GRPO, whose responses are
sampled by a generator seeded per prompt, give the one-process first update's
loss and KL at DP=2. Every method, killed with SIGKILL mid-training, resumes
from its newest checkpoint and ends with the uninterrupted run's figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.execution import run_stages, set_world_size
from pipeline.presets import resolve_configs
from test_dp_sft import kill_when_written
from tiny_lm import build_model, doc_paragraphs, save_hf, write_corpus_upstream, write_upstream

pytestmark = pytest.mark.slow
OVERRIDES = ["align.rm_steps=6", "align.max_steps=30", "align.batch_size=4", "align.checkpoint_every=2",
             "align.judge_prompts=4", "align.learning_rate=1e-3", "align.max_pairs=32", "align.rl_iterations=6",
             "align.rollout_size=8", "align.group_size=4", "align.attribute_steps=6", "align.steer_steps=30"]
PHASE = {"dpo": "dpo", "ppo": "ppo", "grpo": "grpo", "steerlm": "steerlm_sft"}  # the method's last phase
_RUNS: dict[tuple[str, int], Path] = {}


def overrides(method: str) -> list[str]:
    return [*OVERRIDES, f"align.method={method}"]


def make_run_dir(run_dir: Path, tokenizer, method: str, nproc: int) -> Path:
    """Return a run directory whose curate and sft stages are completed, planned for `nproc` ranks."""
    configs = resolve_configs("smoke", overrides(method))
    set_world_size(configs, ["align"], "local", None, nproc)
    write_corpus_upstream(run_dir, configs, doc_paragraphs()[:400])
    save_hf(run_dir / "sft" / "hf", build_model(tokenizer, positions=64), tokenizer)  # as smoke's micro
    write_upstream(run_dir, configs, "sft", {"hf": "hf"})
    return run_dir


def align(run_dir: Path, method: str, nproc: int) -> dict:
    """Run the align stage on `nproc` ranks (NeMo-Run local executor, torchrun); return its manifest."""
    configs = resolve_configs("smoke", overrides(method))
    states = run_stages(run_dir, configs, ["align"], nproc_per_node=nproc, env={"OMP_NUM_THREADS": "1"})
    assert states == {"align": "completed"}, [p.read_text()[-2000:] for p in (run_dir / "align.tmp").glob("failure*")]
    return json.loads((run_dir / "align" / "manifest.json").read_text())


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "align" / "train_log.jsonl").read_text().splitlines()]


def max_rel_diff(a: list[dict], b: list[dict], key: str) -> float:
    """Return the largest relative difference of `key` over two train logs of the same phases and steps."""
    assert [(r["phase"], r["step"]) for r in a] == [(r["phase"], r["step"]) for r in b]
    return max((abs(x[key] - y[key]) / max(abs(x[key]), 1e-6) for x, y in zip(a, b) if key in x), default=0.0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer):
    """Return run(method, nproc) -> the run directory of an uninterrupted align run (each run once per module)."""
    def run(method: str, nproc: int) -> Path:
        if (method, nproc) not in _RUNS:
            run_dir = make_run_dir(tmp_path_factory.mktemp(f"{method}{nproc}") / "run", tokenizer, method, nproc)
            manifest = align(run_dir, method, nproc)
            assert manifest["metrics"]["data_parallel"] == nproc and manifest["metrics"]["resumed_phases"] == []
            _RUNS[(method, nproc)] = run_dir
        return _RUNS[(method, nproc)]
    return run


def test_reward_model_and_dpo_at_dp2_train_the_one_rank_models(uninterrupted):
    one, two = train_log(uninterrupted("dpo", 1)), train_log(uninterrupted("dpo", 2))
    assert {r["phase"] for r in one} == {"reward_model", "dpo"} and len(one) == 6 + 30
    assert max_rel_diff(one, two, "loss") < 1e-5
    dpo = [r["loss"] for r in one if r["phase"] == "dpo"]
    assert dpo[-1] < dpo[0] - 0.05  # it learns: equal losses are not trivially equal
    m1, m2 = (json.loads((uninterrupted("dpo", n) / "align" / "manifest.json").read_text())["metrics"] for n in (1, 2))
    assert m1["rm_val_accuracy"] == m2["rm_val_accuracy"]
    assert m1["val_loss_after"] == pytest.approx(m2["val_loss_after"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_rl_first_update_at_dp2_equals_one_rank(uninterrupted, method):
    one, two = ([r for r in train_log(uninterrupted(method, n)) if r["phase"] == method] for n in (1, 2))
    loss = "policy_loss" if method == "ppo" else "loss"
    for key in (loss, "kl", "reward", "response_tokens"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-4, abs=1e-4), key
    assert one[1]["kl"] != 0.0  # the first update moved the policy: the second rollout's KL is not trivially equal
    assert one[1]["kl"] == pytest.approx(two[1]["kl"], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("method,nproc", [("dpo", 1), ("ppo", 1), ("grpo", 1), ("steerlm", 1), ("dpo", 2)])
def test_sigkill_mid_training_resumes_to_the_uninterrupted_result(tmp_path, tokenizer, uninterrupted, method, nproc):
    reference = uninterrupted(method, nproc)
    run_dir = make_run_dir(tmp_path / "run", tokenizer, method, nproc)
    script = ("import sys; sys.path.insert(0, 'tests'); from test_dp_align import align; "
              f"align(__import__('pathlib').Path({str(run_dir)!r}), {method!r}, {nproc})")
    kill_when_written(script, run_dir / "align.tmp" / "checkpoints" / PHASE[method] / "step_0000002")
    assert not (run_dir / "align" / "manifest.json").exists()

    manifest = align(run_dir, method, nproc)  # the same command again
    m = manifest["metrics"]
    assert manifest["resumed"] and PHASE[method] in m["resumed_phases"]
    for key in ("loss", "policy_loss", "value_loss", "kl", "reward"):
        assert max_rel_diff(train_log(reference), train_log(run_dir), key) <= 1e-5, key
    done = json.loads((reference / "align" / "manifest.json").read_text())["metrics"]
    for key in ("rm_val_accuracy", "win_rate_vs_sft", "judge_score_aligned"):
        assert m[key] == done[key], key
