"""`aigc t2i train|sample` and `aigc nerf train|render`: the multimodal recipes from the command line.

`train` runs the recipe's chain of registered stages on the pipeline's runner
(pipeline.cli.cmd_run_locked: NeMo-Run, `--executor local|slurm`, fingerprints,
manifests, resume, `aigc status --run-dir runs/t2i`); `sample` and `render`
read the trained stages' outputs in this process.

    aigc t2i train [--config tiny] [--run-dir runs/t2i] [--executor local|slurm] [key=value ...]
    aigc t2i sample "a handwritten three" [--steps 50] [--guidance 3] [--sampler ddim] [--num 8] [--out PNG]
    aigc nerf train [--config tiny] [--run-dir runs/nerf] [key=value ...]
    aigc nerf render --pose 30,25 [--out PNG]      |   aigc nerf render --turntable 36 [--out GIF]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

from rich.markup import escape

from pipeline import jobs
from pipeline.cli import add_run_options, cmd_run_locked, console
from pipeline.config import ConfigError
from pipeline.run_lock import RunDirLocked

from multimodal.stages import NERF_ORDER, STAGES, T2I_ORDER


def _stage_fields(order: tuple[str, ...]) -> str:
    """Return a help line listing the stages of a recipe and their settings."""
    return "\n".join(f"  {n}: " + ", ".join(f.name for f in dataclasses.fields(STAGES[n].config_cls)) for n in order)


def _add_train_parser(sub: argparse._SubParsersAction, order: tuple[str, ...], default_dir: str, what: str) -> None:
    """Add the `train` subcommand of a recipe."""
    p = sub.add_parser("train", help=f"run the {what} recipe ({' -> '.join(order)}); finished stages are skipped",
                       description=f"Run {' -> '.join(order)} through NeMo-Run under the stage contract: each "
                       "stage writes <run-dir>/<stage>/ with a manifest.json and is skipped when its fingerprint "
                       "is unchanged.",
                       epilog="settings:\n" + _stage_fields(order), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, default_dir)


def _train(args: argparse.Namespace, chain: str) -> int:
    """Run the registered chain `chain` on the pipeline's runner; return the exit code."""
    try:
        return cmd_run_locked(args, chain=chain)
    except (ConfigError, KeyError, jobs.ClusterError, RunDirLocked) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2


def _command_parser(prog: str, description: str, order, default_dir: str, what: str,
                    command: str, help: str, command_description: str):
    """Return (the parser of `prog`, the parser of its `command`): `train` runs the chain `order`, `command` uses it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub, order, default_dir, what)
    return parser, sub.add_parser(command, help=help, description=command_description)


def t2i_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc t2i`."""
    parser, p = _command_parser(
        "aigc t2i",
        "Text-to-image latent diffusion: a caption set (digits + drawn shapes), an AutoencoderKL, "
        "a text encoder + UNet2DConditionModel trained by DDPM with prompt dropout, sampled by DDIM/DDPM "
        "with classifier-free guidance and judged by a classifier trained on the real images.",
        T2I_ORDER, "runs/t2i", "text-to-image",
        "sample", "generate images for a prompt from a trained run, as a PNG grid",
        "Generate --num images for PROMPT (seeds --seed, --seed+1, ...) with the "
        "model of a finished `aigc t2i train`, written as one PNG grid.",
    )
    p.add_argument("prompt", help='caption, e.g. "a handwritten three" or "a red circle" (words outside the '
                   "training vocabulary are reported and ignored as [UNK])")
    p.add_argument("--run-dir", default="runs/t2i", help="run directory of `aigc t2i train` (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: %(default)s, as judged by t2i_train)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale; 1 = conditional model alone, 0 = unconditional "
                   "(default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="(default: %(default)s)")
    p.add_argument("--num", type=int, default=8, help="images to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    p.add_argument("--out", default=None, help="PNG to write (default: <run-dir>/samples/<prompt>.png)")
    p.add_argument("--scale", type=int, default=4, help="pixel enlargement of the grid (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    return parser


def t2i_main(argv: list[str]) -> int:
    """Run `aigc t2i`; return the exit code."""
    args = t2i_parser().parse_args(argv)
    if args.command == "train":
        return _train(args, "t2i")
    run_dir = Path(args.run_dir)
    train_dir, vae_dir = run_dir / "t2i_train", run_dir / "t2i_vae" / "vae"
    if not (train_dir / "manifest.json").is_file() or not vae_dir.is_dir():
        print(f"aigc t2i sample: no trained model in {run_dir}: run `aigc t2i train --run-dir {run_dir}` first",
              file=sys.stderr)
        return 2
    import torch

    from multimodal.pictures import save_grid
    from multimodal.t2i_model import T2IModel

    torch.set_num_threads(1)
    model = T2IModel.load(vae_dir, train_dir, args.device)
    unknown = model.tokenizer.unknown_words(args.prompt)
    if unknown:
        print(f"aigc t2i sample: not in the training vocabulary (ignored): {', '.join(unknown)}", file=sys.stderr)
    images = model.generate([args.prompt] * args.num, [args.seed + i for i in range(args.num)], args.steps,
                            args.guidance, args.sampler)
    slug = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "prompt"
    out = Path(args.out) if args.out else run_dir / "samples" / f"{slug}.png"
    save_grid(images, out, ncols=min(args.num, 8), scale=args.scale)
    print(f"aigc t2i sample: {args.num} images of {args.prompt!r} ({args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance:g}) -> {out}")
    return 0


def nerf_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc nerf`."""
    parser, p = _command_parser(
        "aigc nerf",
        "NeRF in pure PyTorch on a ray-traced scene (spheres on a floor, Blender-format "
        "transforms + PNGs): positional encoding + MLP, stratified + importance sampling, volume rendering; "
        "held-out PSNR/SSIM against training time.",
        NERF_ORDER, "runs/nerf", "NeRF",
        "render", "render a trained NeRF from a pose (PNG) or round the scene (GIF)",
        "Render the fields of a finished `aigc nerf train` from a camera pose, or a turntable GIF.",
    )
    p.add_argument("--run-dir", default="runs/nerf", help="run directory of `aigc nerf train` (default: %(default)s)")
    p.add_argument("--pose", default="30,30",
                   help="camera: AZIMUTH,ELEVATION[,RADIUS] in degrees (looking at the scene centre; radius "
                   "defaults to the training cameras'), or 16 comma-separated numbers: a row-major 4x4 "
                   "camera-to-world matrix, OpenGL axes (default: %(default)s)")
    p.add_argument("--turntable", type=int, default=0, metavar="FRAMES",
                   help="render FRAMES views round the scene into a GIF instead of one PNG")
    p.add_argument("--out", default=None, help="file to write (default: <run-dir>/render.png or turntable.gif)")
    p.add_argument("--scale", type=int, default=4, help="pixel enlargement (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    return parser


def parse_pose(text: str, radius: float):
    """Return a 4×4 camera-to-world matrix from 'az,el[,r]' (degrees) or 16 row-major numbers."""
    import numpy as np

    from multimodal.nerf_scene import orbit_pose

    values = [float(v) for v in text.split(",")]
    if len(values) == 16:
        return np.array(values, dtype=np.float32).reshape(4, 4)
    if len(values) in (2, 3):
        return orbit_pose(values[0], values[1], values[2] if len(values) == 3 else radius)
    raise ValueError(f"--pose: expected AZIMUTH,ELEVATION[,RADIUS] or 16 numbers, got {len(values)} numbers")


def nerf_main(argv: list[str]) -> int:
    """Run `aigc nerf`; return the exit code."""
    args = nerf_parser().parse_args(argv)
    if args.command == "train":
        return _train(args, "nerf")
    from multimodal.nerf_train import MODEL_DIR

    run_dir = Path(args.run_dir)
    model_dir = run_dir / "nerf_train" / MODEL_DIR
    if not model_dir.is_dir():
        print(f"aigc nerf render: no trained NeRF in {run_dir}: run `aigc nerf train --run-dir {run_dir}` first",
              file=sys.stderr)
        return 2
    import torch

    from multimodal.nerf_model import load_nerf
    from multimodal.nerf_train import render_pose, turntable
    from multimodal.pictures import save_gif, save_grid

    torch.set_num_threads(1)
    coarse, fine, render = load_nerf(model_dir, args.device)
    if args.turntable:
        out = Path(args.out) if args.out else run_dir / "turntable.gif"
        save_gif(turntable(coarse, fine, render, args.turntable), out, scale=args.scale)
        print(f"aigc nerf render: {args.turntable} frames -> {out}")
        return 0
    try:
        c2w = parse_pose(args.pose, render["radius"])
    except ValueError as exc:
        print(f"aigc nerf render: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir / "render.png"
    save_grid(render_pose(coarse, fine, render, c2w)[None], out, ncols=1, scale=args.scale)
    position = ", ".join(f"{v:.2f}" for v in c2w[:3, 3])
    print(f"aigc nerf render: camera at ({position}), {math.degrees(2 * math.atan(0.5 * render['image_size'] / render['focal'])):.0f}° "
          f"field of view -> {out}")
    return 0
