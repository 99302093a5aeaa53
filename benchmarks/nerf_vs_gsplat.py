"""NeRF against 3D Gaussian splatting on the same scene and the same held-out views, in one run.

Runs `nerf_data -> nerf_train` and `nerf_data -> nerf_gsplat` (one nerf_data
stage shared by both) on the pipeline's runner at the given preset (default:
`tiny`, both stages' defaults), then loads both trained models in this process
and times rendering every held-out view `--passes` times each (frames/s, one
thread, same process, same load). Records per method: held-out PSNR/SSIM and
training seconds (wall and this process's CPU) from the stages' manifests, the
render frames/s measured here, and the mean-colour baseline. Times are
wall-clock on whatever else the machine is doing: the load average is printed.

    python benchmarks/nerf_vs_gsplat.py [--config tiny] [--run-dir runs/nerf-vs-gsplat] [--passes 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.execution import run_stages  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import make_plan  # noqa: E402
from record import save  # noqa: E402

from multimodal import gsplat_train, nerf_train  # noqa: E402
from multimodal.nerf_model import load_nerf  # noqa: E402
from multimodal.nerf_scene import read_split  # noqa: E402

console = Console()
STAGES = ("nerf_data", "nerf_train", "nerf_gsplat")


def frames_per_s(render_one, poses, passes: int) -> float:
    """Return held-out frames rendered per second: every pose `passes` times, after one warm-up frame."""
    render_one(poses[0])
    tick = time.perf_counter()
    for _ in range(passes):
        for pose in poses:
            render_one(pose)
    return passes * len(poses) / (time.perf_counter() - tick)


def main() -> None:
    """Run both chains, time both renderers, print the table and save the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="multimodal preset (default: %(default)s)")
    parser.add_argument("--run-dir", default="runs/nerf-vs-gsplat", help="(default: %(default)s)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the held-out views")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    configs = resolve_configs(args.config, args.overrides)
    torch.set_num_threads(configs["run"].threads)
    console.print(f"load average at start: {os.getloadavg()[0]:.1f} (cpus {os.cpu_count()}), torch threads "
                  f"{torch.get_num_threads()}")
    run_dir = Path(args.run_dir)
    started = time.time()
    todo = [p.name for p in make_plan(run_dir, configs, list(STAGES)) if not p.cached]
    if todo:
        run_stages(run_dir, configs, todo)
    m = {name: read_manifest(run_dir / name)["metrics"] for name in STAGES}
    _, test_pose, _ = read_split(run_dir / "nerf_data", "test")

    coarse, fine, nerf_meta = load_nerf(run_dir / "nerf_train" / nerf_train.MODEL_DIR)
    cloud, gs_meta = gsplat_train.load_model(run_dir / "nerf_gsplat")
    with torch.no_grad():
        fps = {"nerf": frames_per_s(lambda p: nerf_train.render_pose(coarse, fine, nerf_meta, p), test_pose,
                                    args.passes),
               "gsplat": frames_per_s(lambda p: gsplat_train.render_pose(cloud, gs_meta, p), test_pose, args.passes)}
    methods = {}
    for key, stage, size in (("nerf", "nerf_train", m["nerf_train"]["params"]),
                             ("gsplat", "nerf_gsplat", m["nerf_gsplat"]["gaussians"])):
        s = m[stage]
        methods[key] = {"stage": stage, "test_psnr": s["test_psnr"], "test_ssim": s["test_ssim"],
                        "train_s": s["train_s"], "train_cpu_s": s["train_cpu_s"], "steps": s["steps"],
                        "render_frames_per_s": round(fps[key], 2), "size": size, "curve": s["curve"]}
    methods["nerf"]["size_unit"], methods["gsplat"]["size_unit"] = "parameters", "Gaussians"
    table = Table(title=f"NeRF vs 3DGS: {m['nerf_data']['test_views']} held-out views, "
                        f"{m['nerf_data']['image_size']}² px")
    for col in ("method", "PSNR dB", "SSIM", "train s (wall)", "train s (CPU)", "render frames/s", "size"):
        table.add_column(col, justify="right")
    for key, r in methods.items():
        table.add_row(key, f"{r['test_psnr']:.2f}", f"{r['test_ssim']:.3f}", f"{r['train_s']:.0f}",
                      f"{r['train_cpu_s']:.0f}", f"{r['render_frames_per_s']:.2f}", f"{r['size']:,} {r['size_unit']}")
    console.print(table)
    console.print(f"mean-colour image: {m['nerf_train']['mean_colour_psnr']} dB; load average at end: "
                  f"{os.getloadavg()[0]:.1f}")
    save("nerf_vs_gsplat", {"config": args.config, "overrides": args.overrides, "threads": torch.get_num_threads(),
                            "train_views": m["nerf_data"]["train_views"], "test_views": m["nerf_data"]["test_views"],
                            "image_size": m["nerf_data"]["image_size"], "passes": args.passes,
                            "mean_colour_psnr": m["nerf_train"]["mean_colour_psnr"],
                            "densify": {k: m["nerf_gsplat"][k] for k in ("cloned", "split", "pruned")},
                            "wall_s": round(time.time() - started, 1), "methods": methods})


if __name__ == "__main__":
    main()
