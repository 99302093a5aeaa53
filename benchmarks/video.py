"""Text-to-video diffusion, measured: `video_data -> video_train` at the tiny defaults with each temporal layer:
a 1-D convolution over frames (the default), temporal attention, and none (the ablation: every frame denoised
alone), beside the real clips and two baselines.

Runs the chain on the pipeline's runner (NeMo-Run, local; finished stages of an unchanged
config are reused, so a rerun only trains what changed) once per `--temporal` variant, each in
its own run dir, then tabulates from the manifests: per-frame judge accuracy (class, object,
colour), motion accuracy (centroid velocity vs the caption's direction), warping error under
the caption's motion, frame-to-frame difference, identity consistency and the FID-like
distance of the frames; training seconds (wall and this process's CPU). Times are wall-clock
on whatever else the machine is doing: the load average is printed and saved.

    python benchmarks/video.py [--config tiny|smoke] [--run-dir runs/video-bench] [--temporal conv,attention,none]

Figures go to benchmarks/results/video.json with the `tiny` config and every variant only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import fmt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from multimodal.video_model import TEMPORAL  # noqa: E402
from pipeline.execution import run_stages  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import make_plan  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
CHAIN = ["video_data", "video_train"]
COLUMNS = ("class_accuracy", "object_accuracy", "colour_accuracy", "motion_accuracy", "warp_error",
           "frame_difference", "identity_consistency", "fid_like")
TRAINING = ("denoiser_params", "steps", "final_loss", "train_s", "train_cpu_s", "eval_s", "sample_steps", "guidance",
            "judge_real_test_accuracy", "fid_like_real_floor", "eval_clips")


def rows_of(metrics: dict) -> dict[str, dict]:
    """Return the reference rows of one run's metrics: the real held-out clips, the still first frame, noise."""
    return {
        "real held-out clips": {"class_accuracy": metrics["real_class_accuracy"],
                                "motion_accuracy": metrics["real_motion_accuracy"],
                                "warp_error": metrics["real_warp_error"],
                                "frame_difference": metrics["real_frame_difference"],
                                "identity_consistency": metrics["real_identity_consistency"],
                                "fid_like": metrics["fid_like_real_floor"]},
        "first real frame held still": {"motion_accuracy": metrics["static_motion_accuracy"],
                                        "warp_error": metrics["static_warp_error"], "frame_difference": 0.0},
        "uniform noise": {"class_accuracy": metrics["noise_class_accuracy"], "fid_like": metrics["noise_fid_like"]},
    }


def main() -> None:
    """Train (or reuse) each variant, print the table, save the figures (tiny config, every variant)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="named config (default: %(default)s; smoke: seconds)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/video-bench-<config>)")
    parser.add_argument("--temporal", default="conv,attention,none", help="variants (default: %(default)s)")
    args = parser.parse_args()
    variants = [v for v in args.temporal.split(",") if v]
    base = Path(args.run_dir or f"runs/video-bench-{args.config}")
    console.print(f"load average at start: {os.getloadavg()[0]:.1f} (cpus {os.cpu_count()}); run dir {base}")
    runs = {}
    for variant in variants:
        configs = resolve_configs(args.config, [f"video_train.temporal={variant}"])
        run_dir = base / variant
        todo = [p.name for p in make_plan(run_dir, configs, CHAIN) if not p.cached]
        started = time.time()
        if todo:
            run_stages(run_dir, configs, todo)
        manifest = read_manifest(run_dir / "video_train")
        data = read_manifest(run_dir / "video_data")["metrics"]
        metrics = manifest["metrics"]
        runs[variant] = {"status": manifest["status"], "wall_s": round(manifest.get("wall_time_s", 0.0), 1),
                         "training": {k: metrics[k] for k in TRAINING if k in metrics},
                         "generated": {k: metrics.get(k) for k in COLUMNS}, "references": rows_of(metrics),
                         "data": data}
        console.print(f"{variant}: {manifest['status']} ({time.time() - started:.0f} s this run)")

    table = Table(title=f"text-to-video ({args.config} config): generated clips vs references")
    table.add_column("clips")
    for col in COLUMNS:
        table.add_column(col.replace("_", " "), justify="right")
    for variant, run in runs.items():
        table.add_row(f"generated, temporal={variant}", *(fmt(run["generated"][c]) for c in COLUMNS))
    for name, row in next(iter(runs.values()))["references"].items():
        table.add_row(name, *(fmt(row.get(c)) for c in COLUMNS))
    console.print(table)
    for variant, run in runs.items():
        console.print(f"{variant}: " + ", ".join(f"{k}={fmt(v)}" for k, v in run["training"].items()))
    console.print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.config == "tiny" and set(variants) == set(TEMPORAL):
        from record import save

        save("video", {"config": args.config, "variants": runs})
    else:
        console.print("(not saved: only the `tiny` run of every variant writes benchmarks/results/video.json)")


if __name__ == "__main__":
    main()
