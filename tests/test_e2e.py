"""The whole chain, end to end, through the real `aigc` CLI and NeMo-Run, on the `smoke` config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.presets import resolve_configs
from pipeline.runner import make_plan
from pipeline.stage import load_registry
from report_browser import ReportBrowser, manifest_metric

LLM_CHAIN = load_registry().chain()  # what `aigc run` runs

pytestmark = pytest.mark.slow


def aigc(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run the aigc CLI in a subprocess; return the completed process (output captured)."""
    env = dict(os.environ, COLUMNS="200")  # rich wraps at the terminal width
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_no_train_eval_overlap(run_dir: Path) -> None:
    """No held-out document (evaluate's), nor a 13-gram of one, is in any stage's training data."""
    import numpy as np

    from curation.corpus import read_corpus
    from curation.decontam import contaminated
    from curation.shingles import ngram_hashes
    from curation.split import NGRAM, read_split

    split = read_split(run_dir / "tokenize" / "split.json")
    docs = read_corpus(run_dir / "curate" / "corpus")
    heldout = [d for d in docs if split.of(d["id"]) == "val"]
    evaluated = [json.loads(line)["id"] for line in (run_dir / "tokenize" / "heldout.jsonl").open()]
    assert evaluated == [d["id"] for d in heldout] and heldout
    eval_hashes = np.unique(ngram_hashes([d["text"] for d in heldout], NGRAM, short_docs=False)[0])

    pretrain_docs = [d for d in docs if split.of(d["id"]) == "train"]  # tokenize's train.bin, what pretrain reads
    tokenize = json.loads((run_dir / "tokenize" / "manifest.json").read_text())["metrics"]
    assert tokenize["train_docs"] == len(pretrain_docs) and tokenize["valid_docs"] == len(heldout)
    sft = [json.loads(line) for line in (run_dir / "sft" / "instructions.jsonl").open()]
    pairs = [json.loads(line) for line in (run_dir / "align" / "pairs.jsonl").open()]
    trained_on = {
        "pretrain": [d["text"] for d in pretrain_docs],
        "sft": [m["content"] for r in sft if r["split"] == "train" for m in r["messages"]],
        "align": [m["content"] for p in pairs if p["split"] == "train"
                  for m in p["prompt"] + p["chosen"] + p["rejected"]],
    }
    ids = {"sft": {r["id"] for r in sft if r["split"] == "train"},
           "align": {p["id"] for p in pairs if p["split"] == "train"}}
    for stage, texts in trained_on.items():
        assert texts, stage
        assert not contaminated(texts, eval_hashes, NGRAM).any(), f"{stage} trained on held-out text"
        assert not ids.get(stage, set()) & split.heldout, stage
    assert {r["id"] for r in sft if r["split"] == "val"} <= split.heldout  # what evaluate scores as chats


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke chain, run once for this module's tests: its run dir and the first `aigc run`."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    dry = aigc("run", "--config", "smoke", "--run-dir", str(run_dir), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert all(name in dry.stdout for name in LLM_CHAIN) and not run_dir.joinpath("curate").exists()
    return run_dir, aigc("run", "--config", "smoke", "--run-dir", str(run_dir))


def test_smoke_chain_runs_to_a_triton_answer_then_is_fully_cached(smoke_run):
    run_dir, first = smoke_run
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-6000:]
    for name in LLM_CHAIN:
        m = json.loads((run_dir / name / "manifest.json").read_text())
        assert m["status"] == "completed", name
        for out in m["outputs"].values():
            assert (run_dir / name / out["path"]).exists()
    answer = json.loads((run_dir / "serve" / "manifest.json").read_text())["metrics"]
    assert isinstance(answer["answer"], str) and answer["answer"].strip()
    assert "Triton answered" in first.stdout
    assert_no_train_eval_overlap(run_dir)

    started = time.time()
    second = aigc("run", "--config", "smoke", "--run-dir", str(run_dir))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing to run" in second.stdout
    assert time.time() - started < 60

    status = aigc("status", "--run-dir", str(run_dir))
    assert status.returncode == 0 and status.stdout.count("completed") == len(LLM_CHAIN), status.stdout

    # a changed setting re-plans only that stage and what follows it
    plan = make_plan(run_dir, resolve_configs("smoke", ["evaluate.max_new_tokens=4"]))
    assert {p.name for p in plan if not p.cached} == {"evaluate"}
    assert all(p.cached for p in make_plan(run_dir, resolve_configs("smoke")))


def test_report_of_the_smoke_chain_in_a_browser(smoke_run):
    run_dir, first = smoke_run
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    written = aigc("report", "--run-dir", str(run_dir))
    assert written.returncode == 0 and "report.html" in written.stdout, written.stdout + written.stderr
    val_loss = manifest_metric(run_dir, "pretrain", "val_loss")
    with ReportBrowser() as browser:  # skips (saying why) only where there is no Chromium
        page = browser.check((run_dir / "report.html").as_uri(), {name: "completed" for name in LLM_CHAIN},
                             ("pretrain", "val_loss", val_loss), min_images=2)  # pretrain's and sft's loss curves
        titles = page.eval_on_selector_all("svg.chart title", "els => els.map(e => e.textContent)")
        assert {"pretrain · loss", "sft · loss", "align · reward_model · loss", "align · dpo · loss"} <= set(titles)
        answer = manifest_metric(run_dir, "serve", "answer")
        assert answer in page.locator('section[data-stage="serve"] table.samples').inner_text()
        models = page.eval_on_selector_all('section[data-stage="evaluate"] table.samples th',
                                           "els => els.map(e => e.textContent)")
        assert models == ["prompt", "pretrain (greedy)", "sft (greedy)", "align (greedy)"]
        consumed = page.locator('section[data-stage="sft"] table.inputs tr[data-input="pretrain"]').inner_text()
        assert json.loads((run_dir / "sft" / "manifest.json").read_text())["inputs"]["pretrain"] in consumed


def test_chain_on_two_ranks_per_node_runs_to_a_triton_answer(tmp_path):
    run_dir = tmp_path / "run"
    result = aigc("run", "--config", "smoke", "--run-dir", str(run_dir), "--nproc-per-node", "2")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    worlds = {name: json.loads((run_dir / name / "manifest.json").read_text())["world_size"] for name in LLM_CHAIN}
    assert worlds == {name: 2 if name in ("pretrain", "sft", "align") else 1 for name in LLM_CHAIN}
    answer = json.loads((run_dir / "serve" / "manifest.json").read_text())["metrics"]["answer"]
    assert isinstance(answer, str) and answer.strip() and "Triton answered" in result.stdout
    status = aigc("status", "--run-dir", str(run_dir))  # plans with the saved world size: all completed
    assert status.returncode == 0 and status.stdout.count("completed") == len(LLM_CHAIN), status.stdout


def test_curate_command_on_user_files(tmp_path):
    shipped = Path(__file__).parent.parent / "curation" / "data" / "pydoc_topics.jsonl"
    lines = shipped.read_text().splitlines()[:30]
    user = tmp_path / "mine.jsonl"
    user.write_text("\n".join(lines + ['{"id": "broken", "text": "unterminated']) + "\n")
    out = tmp_path / "curated"
    result = aigc("curate", "--input", str(user), "--output", str(out), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["rejects"] == 1
    docs = [json.loads(l) for f in sorted((out / "corpus").glob("*.jsonl")) for l in f.read_text().splitlines()]
    input_ids = {json.loads(l)["id"] for l in lines}
    assert docs and {d["id"] for d in docs} <= input_ids
    rejects = (out / "rejects" / "rejects.jsonl").read_text()
    assert '"line": 31' in rejects or '"line":31' in rejects
