"""Consistency models of the t2i latent model, measured: 1, 2 and 4 steps against the teacher's DDIM.

Runs t2i_data -> t2i_vae -> t2i_train -> t2i_consistency on the pipeline's runner (NeMo-Run,
local; finished stages of an unchanged config are reused) once per mode, `distill`
(consistency distillation from the trained t2i_train model) and `train` (consistency
training from scratch), the upstream stages shared; then tabulates the stage's judged rows:
the consistency model at 1, 2 and 4 steps, the teacher's guided DDIM (trailing spacing) at
the same steps, and the teacher's own sampler at its default steps: digit and shape prompt
accuracy, FID-like distance, images per second (one thread, the whole judged set). The
headline: distillation at 1 and 2 steps against the teacher's DDIM at those steps (quality)
and against the teacher at its default steps (images/s ratio). Times are wall-clock on
whatever else the machine is doing: the load average is recorded.

    python benchmarks/consistency.py [--config tiny|smoke] [--run-dir runs/cm-bench] [--modes distill,train] [key=value ...]

Figures go to benchmarks/results/consistency.json with the `tiny` config only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.execution import run_stages  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import make_plan  # noqa: E402
from record import save  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
UPSTREAM = ("t2i_data", "t2i_vae", "t2i_train")


def run_mode(root: Path, mode: str, preset: str, overrides: list[str]) -> Path:
    """Run the chain with t2i_consistency.mode=`mode` in root/<mode> (upstream copied from the first mode's dir
    where that one is done); return the run dir."""
    run_dir = root / mode
    configs = resolve_configs(preset, [*overrides, f"t2i_consistency.mode={mode}"])
    names = [*UPSTREAM, "t2i_consistency"]
    for other in root.iterdir() if root.is_dir() else []:
        for stage in UPSTREAM:
            if other != run_dir and (other / stage / "manifest.json").is_file() and not (run_dir / stage).exists():
                shutil.copytree(other / stage, run_dir / stage)
    todo = [p.name for p in make_plan(run_dir, configs, names) if not p.cached]
    if todo:
        states = run_stages(run_dir, configs, todo)
        if set(states.values()) != {"completed"}:
            raise SystemExit(f"{mode}: {states}")
    return run_dir


def figures_of(run_dir: Path) -> dict:
    """Return one mode's figures: the judged rows, training and stage seconds, the headline ratios."""
    manifest = read_manifest(run_dir / "t2i_consistency")
    metrics = manifest["metrics"]
    quality = json.loads((run_dir / "t2i_consistency" / "quality.json").read_text())
    rows = quality["rows"]
    teacher = {r["steps"]: r for r in rows if r["model"] == "teacher" and not r.get("default")}
    default = next(r for r in rows if r.get("default"))
    headline = []
    for r in rows:
        if r["model"].startswith("cm_") and r["steps"] in teacher:
            t = teacher[r["steps"]]
            headline.append({"steps": r["steps"],
                             "digit_accuracy": r["digit_accuracy"], "teacher_ddim_digit_accuracy": t["digit_accuracy"],
                             "shape_accuracy": r["shape_accuracy"], "teacher_ddim_shape_accuracy": t["shape_accuracy"],
                             "fid_like": r["fid_like"], "teacher_ddim_fid_like": t["fid_like"],
                             "fid_ratio_vs_teacher_ddim": round(r["fid_like"] / t["fid_like"], 3),
                             "speedup_vs_teacher_default": round(r["images_per_s"] / default["images_per_s"], 2)})
    return {"mode": metrics["mode"], "steps": metrics["steps"], "params": metrics["params"],
            "train_s": metrics["train_s"], "eval_s": metrics["eval_s"],
            "stage_s": round(manifest.get("wall_time_s", 0.0), 1), "final_loss": metrics["final_loss"],
            "judge_real_test_accuracy": quality["judge_real_test_accuracy"],
            "fid_like_real_floor": quality["fid_like_real_floor"], "guidance": quality["guidance"],
            "per_prompt": quality["per_prompt"], "rows": rows, "headline": headline}


def print_table(figures: dict) -> None:
    """Print each mode's judged rows."""
    for mode, f in figures["modes"].items():
        table = Table(title=f"t2i_consistency {mode}: {f['steps']} steps in {f['train_s']:.0f} s "
                      f"(stage {f['stage_s']:.0f} s); judge {f['judge_real_test_accuracy']}, floor {f['fid_like_real_floor']}")
        for col in ("model", "sampler", "steps", "digit acc.", "shape acc.", "FID-like", "images/s"):
            table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
        for r in f["rows"]:
            table.add_row(r["model"], r["sampler"], str(r["steps"]), f"{r['digit_accuracy']:.3f}",
                          f"{r['shape_accuracy']:.3f}", f"{r['fid_like']:.1f}", f"{r['images_per_s']:.1f}")
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=("tiny", "smoke"))
    parser.add_argument("--run-dir", default="runs/cm-bench")
    parser.add_argument("--modes", default="distill,train")
    parser.add_argument("overrides", nargs="*", help="key=value settings (stage.field=value)")
    args = parser.parse_args(argv)
    root = Path(args.run_dir)
    figures = {"config": args.config, "overrides": args.overrides, "threads": 1, "modes": {}}
    for mode in args.modes.split(","):
        figures["modes"][mode] = figures_of(run_mode(root, mode, args.config, args.overrides))
    teacher = read_manifest(root / args.modes.split(",")[0] / "t2i_train")["metrics"]
    figures["teacher"] = {k: teacher[k] for k in ("unet_params", "steps", "train_s", "sampler", "sample_steps")
                          if k in teacher}
    print_table(figures)
    if args.config == "tiny" and not args.overrides and args.modes == "distill,train":
        save("consistency", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
