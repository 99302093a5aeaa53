"""The `aigc` command line: run the chain, run one stage, show status, serve and query.

    aigc run [--config tiny] [--run-dir runs/tiny] [--executor local|slurm] [--nproc-per-node N] [--dry-run] [key=value ...]
    aigc run --executor slurm [--cluster NAME] [--cluster-profile PATH] [--detach] [...]
    aigc status [--run-dir runs/tiny]        (Slurm job ids and states too)
    aigc report [--run-dir runs/tiny] [--output FILE] [--serve [--port N]]   (one self-contained HTML file)
    aigc logs STAGE [--run-dir runs/tiny]    / aigc cancel [STAGE ...] [--run-dir runs/tiny]
    aigc <stage> [--config tiny] [--run-dir DIR] [key=value ...]     (also runs missing upstream stages)
    aigc curate --input PATH [PATH ...] --output DIR [key=value ...]
    aigc serve [...] / aigc query "prompt" [...]                     (see `aigc serve --help`)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline import jobs
from pipeline.clusters import DEFAULT_PROFILE_PATH, load_profile
from pipeline.config import ConfigError, RunConfig
from pipeline.execution import EXECUTORS, run_stages, sbatch_scripts, set_world_size
from pipeline.presets import preset_names, resolve_configs
from pipeline.run_lock import RunDirLocked, run_dir_lock
from pipeline.runner import make_plan, stage_dir, stage_state, stage_states
from pipeline.stage import DEFAULT_CHAIN, get_stage, load_registry, upstream_closure

RUN_CONFIG_FILE = "config.json"

console = Console()

# what a command may raise for a user's mistake or an unreachable cluster: one `error:` line, no traceback
CLI_ERRORS = (ConfigError, KeyError, jobs.ClusterError, RunDirLocked)


def error_text(exc: BaseException) -> str:
    """Return the text of `exc` on one line (a KeyError's without its quotes; a list of problems joined by `;`)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip().removeprefix("- ") for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def print_error(exc: BaseException) -> None:
    """Print `exc` as one `error:` line, its text literal (never read as rich markup)."""
    console.print(f"[red]error:[/red] {escape(error_text(exc))}", soft_wrap=True)


OVERRIDES_HELP = (
    "key=value overrides: `stage.field=value` sets a stage setting (e.g. pretrain.max_steps=50), "
    "`field=value` a run-wide one (threads=2, seed=7); in `aigc <stage>` a bare field is that stage's "
    "(aigc pretrain model=small). Unknown keys are an error that lists the valid ones."
)


def add_run_options(p: argparse.ArgumentParser, run_dir: str | None = None) -> None:
    """Add the options shared by `run`, the per-stage commands and `aigc t2i|nerf train` (default dir `run_dir`)."""
    p.add_argument("--config", default="tiny", choices=preset_names(),
                   help="named pipeline config (default: tiny, the 2-core CPU embedded default; smoke: "
                   "seconds, for tests)")
    p.add_argument("--run-dir", default=run_dir,
                   help=f"where stage outputs go (default: {run_dir or 'runs/<config>'})")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="NeMo-Run executor that runs each stage (default: local); slurm submits each stage "
                   "as a Slurm job on the cluster of --cluster")
    p.add_argument("--cluster", default=None, metavar="NAME",
                   help="cluster profile to submit to (slurm; default: the only one in the profile file)")
    p.add_argument("--cluster-profile", default=None, metavar="PATH",
                   help=f"cluster profile file (slurm; default: {DEFAULT_PROFILE_PATH})")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="local executor: run the multi-rank stages (pretrain, sft, align) as N torchrun ranks on "
                   "this machine (gloo on CPU, one torch thread per rank unless threads=K; stage_ranks=pretrain=1 "
                   "keeps one stage at its own count); default: what the last `aigc run` in this run dir used, "
                   "else 1 (the world size is part of those stages' fingerprints). On Slurm the cluster profile's "
                   "nodes x gpus_per_node / ntasks_per_node of each stage decide")
    p.add_argument("--detach", action="store_true",
                   help="slurm: return once the jobs are submitted; follow them with `aigc status`")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (stages, fingerprints, cached or not) and run nothing; "
                   "with --executor slurm also the sbatch scripts it would submit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    """Return the `aigc` argument parser."""
    parser = argparse.ArgumentParser(
        prog="aigc",
        description="aigc: raw text -> curated corpus -> tokens -> pretrained (megatron-core) -> SFT/LoRA "
        "-> DPO -> evaluated -> exported -> served by Triton. Each stage writes <run-dir>/<stage>/ "
        "with a manifest.json and is skipped when its fingerprint is unchanged.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages, in order: " + " -> ".join(load_registry().chain()),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole chain (cached stages are skipped)",
                       description="Run every stage in order through NeMo-Run; stages whose fingerprint "
                       "matches a completed manifest are skipped.")
    add_run_options(p)

    p = sub.add_parser("status", help="show each stage: state, wall time, key metrics, its job")
    p.add_argument("--run-dir", default="runs/tiny", help="run directory (default: runs/tiny)")

    p = sub.add_parser(
        "report", help="write one self-contained HTML report of a run (graph, metrics, curves, samples, images)",
        description="Write one self-contained HTML file of a run: the stage graph with each stage's state "
        "(completed / failed / stale / not run, as `aigc status` judges it), wall time and fingerprint; each "
        "stage's metrics; loss/reward/KL curves drawn from the stages' logs; sample generations (evaluate, "
        "serve); the images the stages wrote (loss curves, t2i sample grids, NeRF renders and turntable GIF); "
        "and the lineage of every artifact (outputs with sha256, the upstream fingerprints each stage read). "
        "Images are inlined as data URIs and nothing is loaded from the network: the file opens anywhere, "
        "offline. Works on a partial run and on a multimodal-only run dir.")
    p.add_argument("--run-dir", default="runs/tiny", help="run directory (default: runs/tiny)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="where to write the HTML (default: <run-dir>/report.html)")
    p.add_argument("--serve", action="store_true",
                   help="then serve it on http://127.0.0.1:PORT/ (this machine only) until Ctrl-C")
    p.add_argument("--port", type=int, default=None, metavar="N",
                   help="port of --serve (default: 8088; 0: any free port)")

    p = sub.add_parser("logs", help="print the log of a stage's last job (local or Slurm)")
    p.add_argument("stage", help="stage name")
    p.add_argument("--run-dir", default="runs/tiny", help="run directory (default: runs/tiny)")

    p = sub.add_parser("cancel", help="cancel the queued or running Slurm jobs of a run")
    p.add_argument("stages", nargs="*", metavar="STAGE", help="stages to cancel (default: all)")
    p.add_argument("--run-dir", default="runs/tiny", help="run directory (default: runs/tiny)")

    commands = load_registry().commands  # commands other packages own, imported only when used
    for name in load_registry().chain():
        if name in commands:
            continue
        p = sub.add_parser(name, help=f"run the {name} stage (and any upstream stage not yet done)",
                           description=f"Run the {name} stage; upstream stages that are missing or "
                           "stale run first. " + (get_stage(name).config_cls.__doc__ or ""))
        if name == "curate":
            p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                           help="JSONL or .txt files/directories to curate (default: the shipped corpus)")
            p.add_argument("--output", default=None, metavar="DIR",
                           help="write the curated corpus here instead of <run-dir>/curate")
        add_run_options(p)

    for name, (_, text) in commands.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _run_dir(args: argparse.Namespace) -> Path:
    """Return the run directory of `args`; raise ConfigError where the path is a file."""
    run_dir = Path(args.run_dir or f"runs/{args.config}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a run directory")
    return run_dir


def _existing_run_dir(path: str) -> Path:
    """Return `path` as the run directory of a command that reads one; raise ConfigError where there is none."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ConfigError(f"no run directory at {run_dir}: nothing has run there (pass --run-dir DIR)")
    return run_dir


def _print_plan(plan: list, executor: str) -> None:
    table = Table(title=f"plan (executor: {executor})")
    for col in ("stage", "fingerprint", "action"):
        table.add_column(col)
    for item in plan:
        table.add_row(item.name, item.fingerprint, "[green]cached" if item.cached else "[yellow]run")
    console.print(table)


def _key_metrics(metrics: dict[str, Any], keys: tuple[str, ...], limit: int = 4) -> str:
    """Return the stage's key metrics (else its first scalar ones) as `k=v` text."""
    names = [k for k in keys if k in metrics] or [k for k, v in metrics.items() if isinstance(v, (int, float))]
    parts = []
    for k in names[:limit] if not keys else names:
        v = metrics[k]
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")
    return " ".join(parts)


def _status_table(run_dir: Path, configs: dict[str, Any] | None, names: list[str]) -> Table:
    """Return a table of each stage's state, wall time, key metrics and (for Slurm runs) its job."""
    fps = {p.name: p.fingerprint for p in make_plan(run_dir, configs, names)} if configs else {}
    records = {s: r for s, r in jobs.read_records(run_dir).items() if r.executor == "slurm"}
    if fps and records:
        jobs.mark_killed_jobs_failed(run_dir, fps)
    job_states = jobs.slurm_states(records)
    table = Table(title=Text(f"aigc status: {run_dir}"))
    for col in ("stage", "state", "wall s", "key metrics") + (("job",) if records else ()):
        table.add_column(col)
    colours = {"completed": "green", "failed": "red", "stale": "yellow", "not run": "dim",
               "pending": "cyan", "running": "cyan"}
    for name, (state, record) in stage_states(run_dir, names, fps).items():
        wall = f"{record['wall_time_s']:.1f}" if record and "wall_time_s" in record else ""
        detail = ""
        if record:
            detail = (record.get("error", "") if state == "failed"
                      else _key_metrics(record.get("metrics", {}), get_stage(name).key_metrics))
        job = ()
        if records:
            record, job_state = records.get(name), job_states.get(name)
            if job_state and job_state.active and state not in ("completed", "failed"):
                state = job_state.state.split()[0].lower()
            job = (jobs.job_summary(record, job_state) if record else "",)
        # text from the system (errors, paths, job states) is shown as it is, never read as markup
        table.add_row(name, Text(state, style=colours.get(state, "white")), wall, Text(detail), *map(Text, job))
    return table


def _saved_world_size(run_dir: Path) -> int:
    """Return the world size the last `aigc run` in run_dir planned with (1 when none)."""
    path = run_dir / RUN_CONFIG_FILE
    overrides = json.loads(path.read_text()).get("overrides", []) if path.is_file() else []
    sizes = [int(o.partition("=")[2]) for o in overrides if o.startswith("world_size=")]
    return sizes[-1] if sizes else 1


def _saved_chain(run_dir: Path) -> str:
    """Return the chain the last `aigc run` (or `aigc t2i|nerf train`) in run_dir ran (default: the LLM chain)."""
    path = run_dir / RUN_CONFIG_FILE
    return json.loads(path.read_text()).get("chain", DEFAULT_CHAIN) if path.is_file() else DEFAULT_CHAIN


def _load_run_configs(run_dir: Path) -> dict[str, Any] | None:
    """Return the configs `aigc run` last used in run_dir, or None."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    try:
        return resolve_configs(saved["config"], saved["overrides"])
    except (KeyError, ConfigError):
        return None


def _qualify(override: str, stage: str) -> str:
    """Return `key=value` as `stage.key=value` when key names neither a section nor a run-wide setting."""
    key = override.partition("=")[0]
    run_wide = {f.name for f in dataclasses.fields(RunConfig)}
    return override if "." in key or key in run_wide or "=" not in override else f"{stage}.{override}"


def cmd_run(args: argparse.Namespace, target: str | None = None, chain: str = DEFAULT_CHAIN) -> int:
    """Run the registered chain `chain` (or `target` and its upstream); return the process exit code."""
    nproc = args.nproc_per_node
    if nproc is not None and (nproc < 1 or (nproc > 1 and args.executor != "local")):  # before any work
        raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: a positive number of ranks, for the local "
                          "executor; on Slurm set ntasks_per_node / gpus_per_node in the cluster profile")
    overrides = [_qualify(o, target) for o in args.overrides] if target else list(args.overrides)
    output_dir = ""
    if target == "curate" and args.input:
        overrides.append("curate.inputs=" + json.dumps([str(Path(p).resolve()) for p in args.input]))
    if target == "curate" and args.output:
        output_dir = str(Path(args.output).resolve())
    configs = resolve_configs(args.config, overrides)
    run_dir = _run_dir(args)
    names = upstream_closure([target]) if target else list(load_registry().chain(chain))
    if output_dir:
        names = ["curate"]
    profile = load_profile(args.cluster_profile, args.cluster) if args.executor == "slurm" else None
    nproc = args.nproc_per_node if args.nproc_per_node is not None else _saved_world_size(run_dir)
    if set_world_size(configs, names, args.executor, profile, nproc) > 1:  # `aigc status` plans with it too
        overrides.append(f"world_size={configs['run'].world_size}")
    if configs["run"].stage_ranks:
        overrides.append("stage_ranks=" + json.dumps(list(configs["run"].stage_ranks)))
    plan = make_plan(run_dir, configs, names)
    if output_dir:
        plan[0].cached = stage_state(Path(output_dir), plan[0].fingerprint)[0] == "completed"
    stage_plans = _check_stage_plans(plan, configs, args.executor)  # a setting a stage would refuse: say so now
    _print_plan(plan, args.executor)
    if args.dry_run:
        for description in stage_plans:
            console.print(description)
        if profile:
            todo = [p.name for p in plan if not p.cached]
            for name, script in sbatch_scripts(run_dir, configs, todo, profile).items():
                console.rule(f"sbatch script of {name} (cluster {profile.name})")
                sys.stdout.write(script + "\n")
            if len(todo) > 1:
                console.print("At submission each job after the first also gets "
                              "--dependency=afterok:<job id of the stage before it>.")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG_FILE).write_text(
        json.dumps({"config": args.config, "chain": chain, "overrides": overrides}, indent=2) + "\n")
    todo = [p.name for p in plan if not p.cached]
    if not todo:
        console.print("[green]Every stage is cached: nothing to run.")
    else:
        states = run_stages(run_dir, configs, todo, executor=args.executor, output_dir=output_dir,
                            profile=profile, detach=args.detach, nproc_per_node=nproc)
        if "submitted" in states.values():
            console.print(f"Submitted {', '.join(todo)} to cluster {profile.name}: follow with "
                          f"`aigc status --run-dir {run_dir}` and `aigc logs STAGE --run-dir {run_dir}`.",
                          markup=False)
            return 0
    if output_dir:
        state = stage_state(Path(output_dir), plan[0].fingerprint)[0]
        console.print(f"curate -> {output_dir}: {state}", markup=False)
        return 0 if state == "completed" else 1
    console.print(_status_table(run_dir, configs, names))
    states = {n: stage_state(stage_dir(run_dir, n), p.fingerprint)[0] for n, p in zip(names, plan)}
    failed = [n for n, s in states.items() if s != "completed"]
    if failed:
        console.print(f"Stage {failed[0]} did not complete; its log: `aigc logs {failed[0]} --run-dir "
                      f"{run_dir}`; its failure record: {run_dir}/{failed[0]}.tmp/failure.json "
                      "(failure.rank<N>.json for a rank of a multi-process stage)", style="red", markup=False)
        return 1
    _print_answer(run_dir)
    return 0


def cmd_run_locked(args: argparse.Namespace, target: str | None = None, chain: str = DEFAULT_CHAIN) -> int:
    """Return `cmd_run`'s exit code, run holding the run dir's lock (RunDirLocked where another aigc holds it).

    One aigc at a time runs stages in a run dir; a dry run only reads it and takes no lock.
    """
    with contextlib.nullcontext() if args.dry_run else run_dir_lock(_run_dir(args)):
        return cmd_run(args, target, chain)


def _check_stage_plans(plan: list, configs: dict[str, Any], executor: str) -> list:
    """Return what each stage to run says of itself for a dry run (e.g. pretrain: layout and memory per rank).

    Raises ConfigError, one line, where a stage would refuse its settings (a layout that does not fit, an
    unknown model), before any stage runs.
    """
    descriptions = []
    for item in plan:
        describe = get_stage(item.name).load_dry_run()
        if item.cached or describe is None:
            continue
        world = configs["run"].ranks_of(item.name, get_stage(item.name).multi_rank)
        try:
            descriptions.append(describe(configs[item.name], world, executor))
        except (ValueError, KeyError) as exc:  # a setting the stage would refuse: say why now
            raise ConfigError(f"{item.name}: {error_text(exc)}") from None
    return descriptions


def cmd_logs(run_dir: Path, stage: str) -> int:
    """Print the log of `stage`'s last job; return the exit code (1 where it has none).

    Raises KeyError for an unknown stage, jobs.ClusterError where its cluster cannot be reached.
    """
    get_stage(stage)
    record = jobs.read_records(run_dir).get(stage)
    if record is None:
        console.print(f"no job of stage {stage!r} recorded in {run_dir}/{jobs.JOBS_DIR}/", style="red", markup=False,
                      soft_wrap=True)
        return 1
    state = jobs.slurm_states({stage: record}).get(stage)
    if state is not None and state.unreachable:
        raise jobs.ClusterError(f"cannot reach the cluster of job {record.job_id} ({stage}) to read its logs: "
                                f"{state.unreachable}")
    console.rule(Text(f"{stage}: {jobs.job_summary(record, state)}"))
    sys.stdout.write(jobs.stage_logs(record))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the run's HTML report (and serve it with --serve); return the exit code."""
    from pipeline import report

    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: a TCP port, 0 to 65535 (0: any free port)")
    if args.port is not None and not args.serve:
        raise ConfigError("--port is the port of --serve: add --serve")
    run_dir = _existing_run_dir(args.run_dir)
    output = Path(args.output) if args.output else run_dir / report.REPORT_FILE
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory: name the HTML file to write")
    chain = _saved_chain(run_dir)
    names = report.report_stages(run_dir, chain)
    configs = _load_run_configs(run_dir)
    chain_names = [n for n in names if n in load_registry().chains.get(chain, ())]
    fingerprints = {p.name: p.fingerprint for p in make_plan(run_dir, configs, chain_names)} if configs else {}
    saved = json.loads((run_dir / RUN_CONFIG_FILE).read_text()) if (run_dir / RUN_CONFIG_FILE).is_file() else None
    try:
        report.write_report(run_dir, output, names, fingerprints, saved)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {output}: {exc.strerror or exc}") from None
    console.print(f"wrote {output} ({len(names)} stages, {output.stat().st_size / 1024:.0f} KiB)", markup=False,
                  soft_wrap=True)
    if args.serve:
        server_port = report.DEFAULT_PORT if args.port is None else args.port
        try:
            report.serve(output, server_port, announce=lambda line: console.print(line, markup=False, soft_wrap=True))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {report.SERVE_HOST}:{server_port}: {exc.strerror or exc}") from None
    return 0


def _print_answer(run_dir: Path) -> None:
    """Print the Triton answer recorded by the serve stage, where there is one."""
    manifest = stage_dir(run_dir, "serve") / "manifest.json"
    if manifest.is_file():
        metrics = json.loads(manifest.read_text()).get("metrics", {})
        if "answer" in metrics:
            console.print(Text.assemble(("Triton answered", "bold"), f" {metrics.get('prompt', '')!r} -> ",
                                        (repr(metrics["answer"]), "cyan")))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aigc` console script; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = load_registry().commands
    if argv and argv[0] in commands:
        module, _, func = commands[argv[0]][0].partition(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run" or args.command in load_registry().chain():
            return cmd_run_locked(args, target=None if args.command == "run" else args.command)
        if args.command == "status":
            run_dir = _existing_run_dir(args.run_dir)
            names = list(load_registry().chain(_saved_chain(run_dir)))
            console.print(_status_table(run_dir, _load_run_configs(run_dir), names))
            return 0
        if args.command == "report":
            return cmd_report(args)
        if args.command == "logs":
            return cmd_logs(_existing_run_dir(args.run_dir), args.stage)
        if args.command == "cancel":
            run_dir = _existing_run_dir(args.run_dir)
            records = jobs.read_records(run_dir)
            for stage in args.stages:
                get_stage(stage)
                if stage not in records or records[stage].executor != "slurm":
                    console.print(f"no Slurm job of stage {stage!r} recorded in {run_dir}/{jobs.JOBS_DIR}/",
                                  style="red", markup=False, soft_wrap=True)
                    return 1
            cancelled = jobs.cancel_jobs(run_dir, args.stages)
            for stage, job_id in cancelled.items():
                console.print(f"cancelled {stage}: Slurm job {job_id}")
            if not cancelled:
                console.print("no queued or running Slurm job to cancel")
            return 0
    except CLI_ERRORS as exc:
        print_error(exc)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
