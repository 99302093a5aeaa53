"""The stage contract: fingerprints, cache hits, atomic failure, resume after a kill, overrides."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import contract_stages
from pipeline import stage as registry
from pipeline.config import ConfigError, RunConfig, apply_overrides
from pipeline.manifest import sha256_file
from pipeline.runner import configs_to_json, execute_stage, make_plan, stage_state

TESTS_DIR = Path(__file__).parent


@pytest.fixture
def toy(monkeypatch):
    """Install the toy a -> b -> c registry for one test."""
    monkeypatch.setattr(registry, "_active", registry._active)  # the real registry comes back after the test
    contract_stages.install()
    return contract_stages


def run_chain(run_dir: Path, cfg: dict) -> dict:
    blob = configs_to_json(cfg)
    return {n: execute_stage(str(run_dir), n, blob) for n in ("a", "b", "c")}


def test_manifest_records_the_contract(toy, tmp_path):
    cfg = toy.configs()
    records = run_chain(tmp_path, cfg)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m == records["c"]
    assert m["status"] == "completed"
    assert m["stage"] == "c" and m["config"] == {"suffix": "!"}
    assert m["inputs"] == {"b": records["b"]["fingerprint"]}
    assert m["outputs"]["dir"]["path"] == "out" and m["outputs"]["dir"]["files"] == 1
    assert "python" in m["versions"] and m["wall_time_s"] >= 0
    a = records["a"]["outputs"]["text"]
    assert a["sha256"] == sha256_file(tmp_path / "a" / a["path"])
    assert (tmp_path / "c" / "out" / "c.txt").read_text() == "hellohello"[:5] + "!"
    assert not list(tmp_path.glob("*.tmp"))


def test_fingerprint_changes_with_config_and_propagates_downstream(toy, tmp_path):
    base = {p.name: p.fingerprint for p in make_plan(tmp_path, toy.configs())}
    assert base == {p.name: p.fingerprint for p in make_plan(tmp_path, toy.configs())}
    changed = {p.name: p.fingerprint for p in make_plan(tmp_path, toy.configs(a__text="other"))}
    assert all(changed[n] != base[n] for n in "abc")
    only_c = {p.name: p.fingerprint for p in make_plan(tmp_path, toy.configs(c__suffix="?"))}
    assert only_c["a"] == base["a"] and only_c["b"] == base["b"] and only_c["c"] != base["c"]
    threads = toy.configs()
    threads["run"] = RunConfig(threads=2)
    assert {p.name: p.fingerprint for p in make_plan(tmp_path, threads)} == base


def test_second_run_is_a_cache_hit(toy, tmp_path, capsys):
    cfg = toy.configs()
    run_chain(tmp_path, cfg)
    assert all(p.cached for p in make_plan(tmp_path, cfg))
    run_chain(tmp_path, cfg)
    assert (tmp_path / "b_calls.txt").read_text().splitlines() == ["0"]  # b ran once
    assert "cached" in capsys.readouterr().out
    # a config change re-runs the changed stage and everything downstream only
    plan = make_plan(tmp_path, toy.configs(c__suffix="?"))
    assert [p.cached for p in plan] == [True, True, False]


def test_failed_stage_leaves_no_output_and_keeps_the_last_good_one(toy, tmp_path):
    run_chain(tmp_path, toy.configs())
    good = (tmp_path / "a" / "a.txt").read_text()
    bad = toy.configs(a__fail=True)
    with pytest.raises(RuntimeError, match="planted failure"):
        execute_stage(str(tmp_path), "a", configs_to_json(bad))
    assert (tmp_path / "a" / "a.txt").read_text() == good  # previous output untouched
    assert not (tmp_path / "a" / "partial.txt").exists()
    fp = make_plan(tmp_path, bad, ["a"])[0].fingerprint
    state, record = stage_state(tmp_path / "a", fp)
    assert state == "failed" and "planted failure" in record["error"]
    # downstream refuses to read a stage that has not completed at its planned fingerprint
    with pytest.raises(RuntimeError, match="run 'a' first|has not completed"):
        execute_stage(str(tmp_path), "b", configs_to_json(bad))


def test_killed_stage_resumes_and_matches_an_uninterrupted_run(tmp_path):
    script = textwrap.dedent(
        """
        import sys, contract_stages
        from pipeline.runner import configs_to_json, execute_stage
        contract_stages.install()
        cfg = contract_stages.configs(b__steps=40)
        for name in ("a", "b"):
            execute_stage(sys.argv[1], name, configs_to_json(cfg))
        """
    )
    env = dict(os.environ, PYTHONPATH=f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], env=dict(env, TOY_SLEEP_S="0.05"))
    ckpt = killed / "b.tmp" / "ckpt.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if ckpt.exists() and json.loads(ckpt.read_text() or '{"step": 0}')["step"] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "b").exists(), "a killed stage must not publish output"
    subprocess.run([sys.executable, "-c", script, str(killed)], env=env, check=True)
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-c", script, str(fresh)], env=env, check=True)
    resumed_from = int((killed / "b_calls.txt").read_text().split()[-1])
    assert resumed_from >= 5
    assert (killed / "b" / "b.txt").read_text() == (fresh / "b" / "b.txt").read_text()
    m = json.loads((killed / "b" / "manifest.json").read_text())
    assert m["resumed"] is True and m["metrics"]["resumed_from_step"] == resumed_from


def test_overrides_are_typed_and_unknown_keys_are_clear():
    @dataclasses.dataclass
    class S:
        n: int = 1
        x: float = 0.5
        flag: bool = False
        names: list[str] = dataclasses.field(default_factory=list)
        opt: int | None = None

    cfg = {"run": RunConfig(), "s": S()}
    apply_overrides(cfg, ["s.n=3", "s.x=1e-3", "s.flag=true", "s.names=a,b", "s.opt=none", "threads=2"])
    assert cfg["s"] == S(n=3, x=1e-3, flag=True, names=["a", "b"], opt=None)
    assert cfg["run"].threads == 2
    apply_overrides(cfg, ['s.names=["x,y", "z"]'])
    assert cfg["s"].names == ["x,y", "z"]
    with pytest.raises(ConfigError, match="unknown key 's.nope'.*flag"):
        apply_overrides(cfg, ["s.nope=1"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(cfg, ["s.n=three"])
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides(cfg, ["zzz.n=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(cfg, ["s.n"])


def test_fingerprint_follows_user_input_files(monkeypatch, tmp_path):
    from pipeline.presets import resolve_configs

    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "one"}\n')
    cfg = resolve_configs("tiny", [f"curate.inputs={data}"])
    before = make_plan(tmp_path, cfg, ["curate"])[0].fingerprint
    data.write_text('{"text": "one, edited"}\n')
    assert make_plan(tmp_path, cfg, ["curate"])[0].fingerprint != before


def test_a_second_aigc_on_a_locked_run_dir_refuses_naming_the_holder(tmp_path):
    """A real process holds the run dir's lock; real `aigc` processes that would run stages refuse with exit 2
    and one line naming its pid, those that only read (--dry-run, status) go on; a killed holder frees it."""
    from pipeline.run_lock import run_dir_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.run_lock import run_dir_lock\n"
         "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(300)", str(tmp_path)],
        cwd=TESTS_DIR.parent, stdout=subprocess.PIPE, text=True,
    )

    def aigc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--run-dir", str(tmp_path)],
                              cwd=TESTS_DIR.parent, capture_output=True, text=True, timeout=300)

    try:
        assert holder.stdout.readline().strip() == "locked"
        for command in (["run"], ["tokenize", "vocab_size=300"]):
            refused = aigc(*command)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert refused.stdout.strip() == (f"error: run directory {tmp_path} is in use by another aigc "
                                              f"(pid {holder.pid}); wait for it to finish, or use another --run-dir")
        assert aigc("run", "--dry-run").returncode == 0
        assert aigc("status").returncode == 0
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(tmp_path):  # the kernel dropped the killed holder's lock
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
