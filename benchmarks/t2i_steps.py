"""Text-to-image quality against sampling steps, for every objective × sampler × backbone.

Trains the t2i latent model once per objective/backbone (t2i_data -> t2i_vae ->
t2i_train on the pipeline's runner, NeMo-Run local; the data and VAE stages run
once and are reused by every combination; finished stages of an unchanged
config are reused on a rerun), at a reduced but meaningful size (`--epochs`,
recorded), then samples each of its samplers at 1, 2, 4, 8, 25 and 50 steps with
classifier-free guidance 3 and records the judge's digit and shape accuracy, the
FID-like distance (beside its real-vs-real floor), the network evaluations (NFE)
and images per second. Writes benchmarks/results/t2i_steps.json and two plots
against NFE beside it (t2i_steps_accuracy.png, t2i_steps_fid.png).
Times are wall-clock on whatever else the machine is doing: the load average is printed.

    python benchmarks/t2i_steps.py [--run-dir runs/t2i-steps] [--epochs 8] [--per-prompt 5] [--steps 1,2,4,8,25,50]
        [--combos ddpm:unet,vp_sde:unet,ve_sde:unet,flow:unet,ddpm:dit,flow:dit] [--config tiny|smoke] [key=value ...]

`--config smoke` is a quick check of the script: it saves nothing under benchmarks/results
(plots go to the run dir).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from multimodal.objectives import SAMPLERS  # noqa: E402
from multimodal.pictures import save_line_plot  # noqa: E402
from multimodal.t2i_data import read_caption_set  # noqa: E402
from multimodal.t2i_judge import build_judge  # noqa: E402
from multimodal.t2i_model import T2IModel  # noqa: E402
from multimodal.t2i_train import judge_setting  # noqa: E402
from pipeline.execution import run_stages  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import make_plan  # noqa: E402
from record import RESULTS, save  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
COMBOS = "ddpm:unet,vp_sde:unet,ve_sde:unet,flow:unet,ddpm:dit,flow:dit"
GUIDANCE = 3.0


def train(root: Path, objective: str, backbone: str, args) -> Path:
    """Run t2i_data -> t2i_vae -> t2i_train for one objective/backbone (data and VAE copied from the first
    combination's run dir when they are not there yet); return its run dir."""
    run_dir = root / f"{objective}-{backbone}"
    first = next((d for d in sorted(root.glob("*-*")) if (d / "t2i_vae" / "manifest.json").is_file()), None)
    if first is not None and first != run_dir:
        for stage in ("t2i_data", "t2i_vae"):
            if not (run_dir / stage).exists():
                shutil.copytree(first / stage, run_dir / stage)
    overrides = [f"t2i_train.objective={objective}", f"t2i_train.backbone={backbone}",
                 f"t2i_train.epochs={args.epochs}", f"t2i_train.eval_per_prompt={args.per_prompt}",
                 f"t2i_train.guidance_scales={GUIDANCE:g}", "t2i_train.steps_curve=25", *args.overrides]
    configs = resolve_configs(args.config, overrides)
    names = ["t2i_data", "t2i_vae", "t2i_train"]
    todo = [p.name for p in make_plan(run_dir, configs, names) if not p.cached]
    if todo:
        run_stages(run_dir, configs, todo)
    return run_dir


def sweep(run_dir: Path, objective: str, backbone: str, steps_list: list[int], per_prompt: int, seed: int) -> dict:
    """Judge every sampler of the objective at every step count; print a table; return the combination's figures."""
    data = read_caption_set(run_dir / "t2i_data")
    judge = build_judge(data, per_prompt, seed)
    model = T2IModel.load(run_dir / "t2i_vae" / "vae", run_dir / "t2i_train")
    train_m = read_manifest(run_dir / "t2i_train")["metrics"]
    table = Table(title=f"{objective} / {backbone}: guidance {GUIDANCE:g}, {per_prompt} images per prompt")
    for col in ("sampler", "steps", "NFE", "digit acc", "shape acc", "FID-like", "images/s"):
        table.add_column(col, justify="right")
    points = []
    for sampler in SAMPLERS[objective]:
        for steps in steps_list:
            j = judge_setting(model, judge, per_prompt, steps, GUIDANCE, sampler)
            points.append({"sampler": sampler, "steps": steps, "nfe": j["nfe"],
                           "digit_accuracy": round(j["digit_accuracy"], 4),
                           "shape_accuracy": round(j["shape_accuracy"], 4),
                           "fid_like": round(j["fid_like"], 3), "images_per_s": round(j["images_per_s"], 1)})
            p = points[-1]
            table.add_row(sampler, str(steps), str(p["nfe"]), f"{p['digit_accuracy']:.3f}", f"{p['shape_accuracy']:.3f}",
                          f"{p['fid_like']:.1f}", f"{p['images_per_s']:.1f}")
    console.print(table)
    return {"objective": objective, "backbone": backbone, "params": train_m[f"{backbone}_params"],
            "train_steps": train_m["steps"], "train_s": train_m["train_s"], "final_loss": train_m["final_loss"],
            "judge_real_accuracy": round(judge.real_test_accuracy, 4), "fid_floor": round(judge.floor, 3),
            "fid_floor_per_prompt": per_prompt,
            "points": points}


def save_plots(results: list[dict], prefix: Path) -> list[Path]:
    """Write two panel figures (one panel per objective/backbone, one line per sampler) against log2 NFE:
    mean judge accuracy (digits and shapes) and FID-like; return their paths."""
    written = []
    for name, title, value in (
        ("accuracy", "judge accuracy", lambda p: (p["digit_accuracy"] + p["shape_accuracy"]) / 2),
        ("fid", "FID-like", lambda p: p["fid_like"]),
    ):
        panels = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, r in enumerate(results):
                series = {s: [(math.log2(p["nfe"]), value(p)) for p in r["points"] if p["sampler"] == s]
                          for s in SAMPLERS[r["objective"]]}
                path = save_line_plot(series, Path(tmp) / f"{i}.png", f"{r['objective']}/{r['backbone']}: {title}",
                                      "log2 NFE", size=(360, 240))
                panels.append(Image.open(path).convert("RGB"))
            cols = min(3, len(panels))
            rows = -(-len(panels) // cols)
            canvas = Image.new("RGB", (cols * 360, rows * 240), (255, 255, 255))
            for i, panel in enumerate(panels):
                canvas.paste(panel, ((i % cols) * 360, (i // cols) * 240))
        written.append(prefix.with_name(f"{prefix.name}_{name}.png"))
        canvas.save(written[-1])
    return written


def main() -> None:
    """Parse arguments, train and sweep every combination, save the results and plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/t2i-steps", help="(default: %(default)s)")
    parser.add_argument("--config", default="tiny", choices=("tiny", "smoke"), help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="t2i_train epochs per combination (default: %(default)s)")
    parser.add_argument("--per-prompt", type=int, default=5, help="images per class prompt (default: %(default)s)")
    parser.add_argument("--steps", default="1,2,4,8,25,50", help="sampler steps (default: %(default)s)")
    parser.add_argument("--combos", default=COMBOS, help="objective:backbone,... (default: %(default)s)")
    parser.add_argument("--name", default="t2i_steps", help="results name: benchmarks/results/NAME.json and its "
                        "plots (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more config overrides")
    args = parser.parse_args()
    configs = resolve_configs(args.config, args.overrides)
    torch.set_num_threads(configs["run"].threads)
    console.print(f"load average at start: {os.getloadavg()[0]:.1f} (cpus {os.cpu_count()}), torch threads "
                  f"{torch.get_num_threads()}")
    root = Path(args.run_dir)
    steps_list = [int(s) for s in args.steps.split(",")]
    started = time.time()
    results = []
    combos = args.combos.split(",")
    for combo in combos:  # the results file is rewritten after each combination (a killed run keeps those done)
        objective, backbone = combo.split(":")
        run_dir = train(root, objective, backbone, args)
        results.append(sweep(run_dir, objective, backbone, steps_list, args.per_prompt, configs["run"].seed))
        vae_m = read_manifest(root / f"{results[0]['objective']}-{results[0]['backbone']}" / "t2i_vae")["metrics"]
        plots = save_plots(results, (RESULTS if args.config == "tiny" else root) / args.name)
        console.print(f"plots: {', '.join(str(p) for p in plots)}; load average: {os.getloadavg()[0]:.1f}; "
                      f"{time.time() - started:.0f} s so far")
        if args.config != "tiny":
            continue
        save(args.name, {"settings": {"epochs": args.epochs, "per_prompt": args.per_prompt, "guidance": GUIDANCE,
                                        "steps": steps_list, "overrides": args.overrides,
                                        "threads": torch.get_num_threads(), "vae_steps": vae_m["steps"]},
                           "wall_s": round(time.time() - started), "combos_planned": combos, "combos": results,
                           "plots": [str(p.relative_to(RESULTS.parent.parent)) for p in plots]})

if __name__ == "__main__":
    main()
