"""Runs planned stages as NeMo-Run tasks: one `run.Partial` per stage in one `run.Experiment`.

The executor is chosen here, at launch, from its name; recipes never name one.
Experiment metadata and per-stage logs land in `<run_dir>/.nemo_run/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from pipeline.runner import configs_to_json, make_plan, stage_dir, stage_state

EXECUTORS = ("local",)


def make_executor(name: str) -> Any:
    """Return the NeMo-Run executor called `name`."""
    import nemo_run as run

    if name == "local":
        return run.LocalExecutor()
    raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")


def run_stages(run_dir: Path, configs: dict[str, Any], names: list[str], executor: str = "local",
               output_dir: str = "", task: Callable | None = None) -> dict[str, str]:
    """Run `names` in order as NeMo-Run tasks; return stage -> 'completed' | 'failed' | 'not run'.

    Stages run one after another; a stage whose upstream failed stops at once
    with a message naming the upstream stage. `task` is the task body
    (default `pipeline.runner.stage_task`).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["NEMORUN_HOME"] = str(run_dir / ".nemo_run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import nemo_run as run
    from nemo_run.config import set_nemorun_home

    from pipeline.runner import stage_task

    task = task or stage_task
    set_nemorun_home(os.environ["NEMORUN_HOME"])
    blob = configs_to_json(configs)
    with run.Experiment("aigc", executor=make_executor(executor), log_level="WARN",
                        enable_goodbye_message=False) as exp:
        for name in names:
            partial = run.Partial(task, run_dir=str(run_dir), name=name, configs_json=blob,
                               output_dir=output_dir)
            exp.add(partial, name=name, tail_logs=True)
        exp.run(sequential=True, tail_logs=True)
    final_dirs = {n: Path(output_dir).resolve() if output_dir else stage_dir(run_dir, n) for n in names}
    plan = {p.name: p for p in make_plan(run_dir, configs, names)}
    return {n: stage_state(final_dirs[n], plan[n].fingerprint)[0] for n in names}
