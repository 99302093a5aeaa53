"""Stages run as NeMo-Run tasks in a real LocalExecutor experiment."""

from __future__ import annotations

import json
import os

import pytest

import contract_stages
from pipeline import stage as registry
from pipeline.execution import run_stages

pytestmark = pytest.mark.slow


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_active", registry._active)  # the real registry comes back after the test
    contract_stages.install()
    tests_dir = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return contract_stages


def test_local_executor_runs_the_chain_and_stops_after_a_failure(toy, tmp_path):
    ok = run_stages(tmp_path / "ok", toy.configs(), ["a", "b", "c"], task=toy.toy_stage_task)
    assert ok == {"a": "completed", "b": "completed", "c": "completed"}
    m = json.loads((tmp_path / "ok" / "c" / "manifest.json").read_text())
    assert m["status"] == "completed"
    logs = list((tmp_path / "ok" / ".nemo_run" / "experiments" / "aigc").rglob("*.log"))
    assert logs, "NeMo-Run keeps per-task logs"

    bad = run_stages(tmp_path / "bad", toy.configs(a__fail=True), ["a", "b", "c"], task=toy.toy_stage_task)
    assert bad == {"a": "failed", "b": "not run", "c": "not run"}
    failure = json.loads((tmp_path / "bad" / "a.tmp" / "failure.json").read_text())
    assert "planted failure" in failure["error"]
    assert not (tmp_path / "bad" / "b").exists()
