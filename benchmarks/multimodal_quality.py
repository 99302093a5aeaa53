"""Measured quality of the multimodal recipes: text-to-image prompt accuracy and FID-like distance,
NeRF held-out PSNR/SSIM against training time.

Runs the recipes' chains of stages on the pipeline's runner (NeMo-Run, local;
finished stages of an unchanged config are reused), then:
  t2i  — the judge (an MLP trained on the real images, its accuracy on held-out
         real images printed) scores images generated from every class prompt:
         prompt accuracy on the digits and on the shapes, and the Fréchet
         distance of the judge's hidden features against held-out real images,
         for each sampler setting (DDIM and DDPM, steps, guidance scales),
         next to the real-vs-real floor of that distance;
  nerf — held-out PSNR/SSIM at each evaluation against training seconds, the
         mean-colour baseline, and the seconds to reach 25 dB.
Times are wall-clock on whatever else the machine is doing: the load average is printed.

    python benchmarks/multimodal_quality.py [--config tiny] [--run-dir runs/mm-bench] [--only t2i|nerf] [key=value ...]
    python benchmarks/multimodal_quality.py --samplers ddim:25:1,ddim:25:3,ddpm:100:3 t2i_train.device=cuda
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.execution import run_stages  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import make_plan  # noqa: E402
from pipeline.stage import load_registry  # noqa: E402
from record import save  # noqa: E402

from multimodal.t2i_data import class_prompts, read_caption_set  # noqa: E402
from multimodal.t2i_judge import build_judge, judge_images  # noqa: E402
from multimodal.t2i_model import T2IModel  # noqa: E402

console = Console()


def sampler_settings(text: str) -> list[tuple[str, int, float]]:
    """Return [(sampler, steps, guidance)] from 'ddim:25:3,ddpm:100:3'."""
    out = []
    for item in text.split(","):
        name, steps, guidance = item.split(":")
        out.append((name, int(steps), float(guidance)))
    return out


def run_chain(run_dir: Path, chain: str, configs: dict) -> dict[str, dict]:
    """Run the stages of a registered chain that are not cached; return stage -> manifest."""
    names = list(load_registry().chain(chain))
    todo = [p.name for p in make_plan(run_dir, configs, names) if not p.cached]
    if todo:
        run_stages(run_dir, configs, todo)
    return {name: read_manifest(run_dir / name) for name in names}


def bench_t2i(run_dir: Path, configs: dict, settings: list[tuple[str, int, float]], per_prompt: int) -> dict:
    """Run the t2i recipe, then judge every sampler setting; print a table; return the figures."""
    manifests = run_chain(run_dir, "t2i", configs)
    vae_m, train_m = manifests["t2i_vae"]["metrics"], manifests["t2i_train"]["metrics"]
    data = read_caption_set(run_dir / "t2i_data")
    model = T2IModel.load(run_dir / "t2i_vae" / "vae", run_dir / "t2i_train", configs["t2i_train"].device)
    judge = build_judge(data, per_prompt, configs["run"].seed)
    prompts = class_prompts()
    classes = np.repeat(np.arange(len(prompts)), per_prompt)
    seeds = [10_000 + i for i in range(len(classes))]

    table = Table(title=f"t2i: judged samples ({per_prompt} per prompt, {len(prompts)} prompts)")
    for col in ("sampler", "steps", "guidance", "digit acc", "shape acc", "FID-like", "sample s"):
        table.add_column(col, justify="right")
    samplers = []
    for name, steps, guidance in settings:
        started = time.time()
        images = model.generate([prompts[c] for c in classes], seeds, steps, guidance, name)
        secs = time.time() - started
        j = judge_images(judge, images, classes)
        samplers.append({"sampler": name, "steps": steps, "guidance": guidance, "sample_s": round(secs, 1),
                         **{k: round(float(j[k]), 4) for k in ("digit_accuracy", "shape_accuracy", "fid_like")}})
        table.add_row(name, str(steps), f"{guidance:g}", f"{j['digit_accuracy']:.3f}", f"{j['shape_accuracy']:.3f}",
                      f"{j['fid_like']:.2f}", f"{secs:.1f}")
    console.print(table)
    console.print(
        f"VAE: recon PSNR {vae_m['recon_psnr_db']} dB, latent {vae_m['latent_shape']}, {vae_m['train_s']} s "
        f"({vae_m['train_cpu_s']} CPU s); UNet {train_m['unet_params']:,} + text {train_m['text_params']:,} params, "
        f"{train_m['steps']} steps in {train_m['train_s']} s ({train_m['train_cpu_s']} CPU s); judge accuracy on held-out real images "
        f"{judge.real_test_accuracy:.4f}; FID-like real-vs-real floor {judge.floor:.2f}"
    )
    return {"per_prompt": per_prompt, "prompts": len(prompts), "vae": vae_m, "train": train_m,
            "judge_real_accuracy": round(float(judge.real_test_accuracy), 4), "fid_floor": round(float(judge.floor), 2),
            "samplers": samplers}


def bench_nerf(run_dir: Path, configs: dict) -> dict:
    """Run the NeRF recipe; print its PSNR/SSIM-vs-time curve; return the nerf_train metrics."""
    m = run_chain(run_dir, "nerf", configs)["nerf_train"]["metrics"]
    table = Table(title="nerf: held-out views vs training time")
    for col in ("step", "train s (wall)", "train s (CPU)", "PSNR dB", "SSIM"):
        table.add_column(col, justify="right")
    for step, secs, cpu, p, s in m["curve"]:
        table.add_row(str(int(step)), f"{secs:.0f}", f"{cpu:.0f}", f"{p:.2f}", f"{s:.3f}")
    console.print(table)
    console.print(f"NeRF: {m['params']:,} params, {m['rays_per_s']} rays/s, final PSNR {m['test_psnr']} dB, "
                  f"SSIM {m['test_ssim']}, mean-colour baseline {m['mean_colour_psnr']} dB, "
                  f"25 dB reached after {m['seconds_to_25db']} s of training (wall; {m['cpu_seconds_to_25db']} CPU s)")
    return m


def main() -> None:
    """Parse arguments, run the benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="multimodal preset (default: %(default)s)")
    parser.add_argument("--run-dir", default="runs/mm-bench", help="(default: %(default)s)")
    parser.add_argument("--only", choices=("t2i", "nerf"), help="run one recipe only")
    parser.add_argument("--samplers", default="ddim:25:0,ddim:25:1,ddim:25:3,ddim:10:3,ddim:50:3,ddpm:100:3",
                        help="sampler:steps:guidance settings judged (default: %(default)s)")
    parser.add_argument("--per-prompt", type=int, default=20, help="images per class prompt (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    configs = resolve_configs(args.config, args.overrides)
    torch.set_num_threads(configs["run"].threads)
    load = os.getloadavg()
    console.print(f"load average at start: {load[0]:.1f} (cpus {os.cpu_count()}), torch threads "
                  f"{torch.get_num_threads()}")
    run_dir = Path(args.run_dir)
    figures = {"config": args.config, "overrides": args.overrides, "threads": torch.get_num_threads()}
    if args.only in (None, "t2i"):
        figures["t2i"] = bench_t2i(run_dir, configs, sampler_settings(args.samplers), args.per_prompt)
    if args.only in (None, "nerf"):
        figures["nerf"] = bench_nerf(run_dir, configs)
    console.print(f"load average at end: {os.getloadavg()[0]:.1f}")
    save("multimodal_quality" + (f"_{args.only}" if args.only else ""), figures)


if __name__ == "__main__":
    main()
