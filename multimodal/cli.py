"""`aigc t2i data|vae|train|consistency|sample`, `aigc nerf data|train|gsplat|render`, `aigc video data|train|sample`,
`aigc zoo`: the multimodal recipes from the command line.

One subcommand per registered stage runs that stage and its upstream on the
pipeline's runner (pipeline.cli.cmd_run_locked: NeMo-Run, `--executor
local|slurm`, fingerprints, manifests, resume, `aigc status --run-dir
runs/t2i`), as `aigc sft` does for the LLM chain; `train` is the last stage, so
it runs the whole recipe. `sample` and `render` read the trained stages'
outputs in this process.

    aigc t2i train [--config tiny] [--run-dir runs/t2i] [--executor local|slurm] [key=value ...]
    aigc t2i vae steps=800                            (t2i_data -> t2i_vae only)
    aigc t2i sample "a handwritten three" [--steps 50] [--guidance 3] [--sampler ddim] [--num 8] [--out PNG]
    aigc t2i consistency [mode=distill|train] [key=value ...]   (t2i_data -> ... -> t2i_train -> t2i_consistency)
    aigc t2i sample "a handwritten three" --consistency [--steps 1..4]
    aigc nerf train [--config tiny] [--run-dir runs/nerf] [key=value ...]
    aigc nerf render --pose 30,25 [--out PNG]      |   aigc nerf render --turntable 36 [--out GIF]
    aigc nerf gsplat [key=value ...]               (nerf_data -> nerf_gsplat: 3D Gaussian splatting, no NeRF)
    aigc nerf render --gsplat --pose 30,25         (the Gaussians instead of the NeRF)
    aigc zoo list   |   aigc zoo RECIPE train [--config tiny|smoke] [--run-dir runs/zoo] [key=value ...]
    aigc zoo RECIPE sample [--num 16] [--seed 0] [--temperature T] [--label K] [--out PNG]
    aigc video train [--config tiny] [--run-dir runs/video] [key=value ...]     (video_data -> video_train)
    aigc video sample "a red circle moving right" [--steps 20] [--guidance 2] [--num 4] [--out GIF]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

from pipeline.cli import CLI_ERRORS, add_run_options, cmd_run_locked, print_error

from multimodal.stages import STAGES

T2I_CHAINS = ("t2i", "t2i_consistency")  # `aigc t2i consistency` runs the second
NERF_CHAINS = ("nerf", "nerf_gsplat")  # `aigc nerf gsplat`: 3D Gaussian splatting on nerf_data's views


def stage_commands(order: tuple[str, ...]) -> dict[str, str]:
    """Return {subcommand: stage} of a recipe's chain: `t2i_vae` is `aigc t2i vae`."""
    return {name.split("_", 1)[1]: name for name in order}


def _settings(name: str) -> str:
    """Return a help line listing the settings of stage `name`."""
    return f"  {name}: " + ", ".join(f.name for f in dataclasses.fields(STAGES[name].config_cls))


def chain_commands(chains: tuple[str, ...]) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Return {subcommand: (chain, stage, the stages it runs)} of a recipe's registered chains: each stage's own
    command runs its chain up to it (`aigc nerf gsplat`: nerf_data -> nerf_gsplat, without nerf_train)."""
    from multimodal.stages import CHAINS

    commands: dict[str, tuple[str, str, tuple[str, ...]]] = {}
    for chain in chains:
        order = CHAINS[chain]
        for command, name in stage_commands(order).items():
            commands.setdefault(command, (chain, name, order[: order.index(name) + 1]))
    return commands


def _add_stage_parsers(sub: argparse._SubParsersAction, chains: tuple[str, ...], default_dir: str) -> None:
    """Add one subcommand per stage of a recipe: it runs that stage and whichever stages it needs are not done."""
    for command, (_, name, needs) in chain_commands(chains).items():
        what = STAGES[name].config_cls.__doc__.split("(", 1)[-1].rstrip(").")
        p = sub.add_parser(command, help=f"run {' -> '.join(needs)} ({what}); finished stages are skipped",
                           description=f"Run {' -> '.join(needs)} through NeMo-Run under the stage contract: each "
                           "stage writes <run-dir>/<stage>/ with a manifest.json and is skipped when its fingerprint "
                           f"is unchanged. A bare key=value sets {name}'s setting; qualify others (stage.key=value).",
                           epilog="settings:\n" + "\n".join(_settings(n) for n in needs),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_run_options(p, default_dir)


def run_stage_command(args: argparse.Namespace, chains: tuple[str, ...]) -> int | None:
    """Run the stage of subcommand `args.command` (and its upstream) if it is one; return the exit code, or None
    for a command that is not a stage's."""
    found = chain_commands(chains).get(args.command)
    if found is None:
        return None
    chain, stage, _ = found
    return _run_stage(args, chain, stage)


def _run_stage(args: argparse.Namespace, chain: str, stage: str) -> int:
    """Run `stage` of the registered chain `chain` (and its upstream) on the pipeline's runner; return the exit code."""
    try:
        return cmd_run_locked(args, target=stage, chain=chain)
    except CLI_ERRORS as exc:
        print_error(exc)
        return 2


def _command_parser(prog: str, description: str, chains: tuple[str, ...], default_dir: str,
                    command: str, help: str, command_description: str):
    """Return (the parser of `prog`, the parser of its `command`): one subcommand per stage of the registered
    `chains`, and `command` that uses the trained stages."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_stage_parsers(sub, chains, default_dir)
    return parser, sub.add_parser(command, help=help, description=command_description)


def add_sample_options(p: argparse.ArgumentParser, item: str, num: int, kind: str) -> None:
    """Add --num, --seed, --out, --scale and --device to a `sample` parser writing `num` `item`s to one `kind` file."""
    p.add_argument("--num", type=int, default=num, help=f"{item}s to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help=f"seed of the first {item} (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help=f"{kind} to write (default: <run-dir>/samples/<prompt>.{kind.lower()})")
    p.add_argument("--scale", type=int, default=4, help="pixel enlargement of the grid (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def sample_path(args: argparse.Namespace, run_dir: Path, suffix: str) -> Path:
    """Return --out, or <run-dir>/samples/<the prompt as a file name><suffix>."""
    if args.out:
        return Path(args.out)
    slug = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "prompt"
    return run_dir / "samples" / f"{slug}{suffix}"


def t2i_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc t2i`."""
    parser, p = _command_parser(
        "aigc t2i",
        "Text-to-image latent diffusion: a caption set (digits + drawn shapes), an AutoencoderKL, "
        "a text encoder + UNet2DConditionModel trained by DDPM with prompt dropout, sampled by DDIM/DDPM "
        "with classifier-free guidance and judged by a classifier trained on the real images.",
        T2I_CHAINS, "runs/t2i",
        "sample", "generate images for a prompt from a trained run, as a PNG grid",
        "Generate --num images for PROMPT (seeds --seed, --seed+1, ...) with the "
        "model of a finished `aigc t2i train`, written as one PNG grid.",
    )
    p.add_argument("prompt", help='caption, e.g. "a handwritten three" or "a red circle" (words outside the '
                   "training vocabulary are reported and ignored as [UNK])")
    p.add_argument("--run-dir", default="runs/t2i", help="run directory of `aigc t2i train` (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: 25, as judged by t2i_train; 1 with --consistency)")
    p.add_argument("--consistency", action="store_true",
                   help="sample the consistency model of `aigc t2i consistency` in --steps (1-4) network passes "
                   "(--guidance and --sampler do not apply: a distilled model has its teacher's guidance built in)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale; 1 = conditional model alone, 0 = unconditional "
                   "(default: %(default)s)")
    p.add_argument("--sampler", default=None, choices=("ddim", "ddpm", "dpm", "em", "pc", "ode", "euler", "heun"),
                   help="one of the trained objective's samplers: ddpm: ddim|ddpm|dpm; vp_sde, ve_sde: em|pc|ode; "
                   "flow: euler|heun (default: the objective's, ddim for ddpm)")
    add_sample_options(p, "image", 8, "PNG")
    return parser


def t2i_main(argv: list[str]) -> int:
    """Run `aigc t2i`; return the exit code."""
    args = t2i_parser().parse_args(argv)
    code = run_stage_command(args, T2I_CHAINS)
    if code is not None:
        return code
    if args.consistency:
        return consistency_sample(args)
    args.steps = 25 if args.steps is None else args.steps
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
    from multimodal.objectives import objective_of, resolve_sampler

    objective = objective_of(model.scheduler)
    try:
        sampler = resolve_sampler(objective, args.sampler)
    except ValueError as exc:
        print(f"aigc t2i sample: {exc}", file=sys.stderr)
        return 2
    images = model.generate([args.prompt] * args.num, [args.seed + i for i in range(args.num)], args.steps,
                            args.guidance, sampler)
    out = sample_path(args, run_dir, ".png")
    save_grid(images, out, ncols=min(args.num, 8), scale=args.scale)
    print(f"aigc t2i sample: {args.num} images of {args.prompt!r} ({objective}, {sampler}, {args.steps} steps, "
          f"guidance {args.guidance:g}) -> {out}")
    return 0


def consistency_sample(args: argparse.Namespace) -> int:
    """Run `aigc t2i sample --consistency`: images from the t2i_consistency stage's model; return the exit code."""
    run_dir = Path(args.run_dir)
    stage_dir, vae_dir = run_dir / "t2i_consistency", run_dir / "t2i_vae" / "vae"
    if not (stage_dir / "manifest.json").is_file() or not vae_dir.is_dir():
        print(f"aigc t2i sample: no consistency model in {run_dir}: run `aigc t2i consistency --run-dir {run_dir}` "
              "first", file=sys.stderr)
        return 2
    steps = 1 if args.steps is None else args.steps
    import torch

    from multimodal.consistency import ConsistencyModel
    from multimodal.pictures import save_grid

    torch.set_num_threads(1)
    model = ConsistencyModel.load(vae_dir, stage_dir, args.device)
    if not 1 <= steps <= model.f.schedule.config.num_train_timesteps:
        print(f"aigc t2i sample: --steps {steps}: 1 to {model.f.schedule.config.num_train_timesteps} (the model's "
              "grid; it was judged at 1, 2 and 4)", file=sys.stderr)
        return 2
    unknown = model.tokenizer.unknown_words(args.prompt)
    if unknown:
        print(f"aigc t2i sample: not in the training vocabulary (ignored): {', '.join(unknown)}", file=sys.stderr)
    images = model.generate([args.prompt] * args.num, [args.seed + i for i in range(args.num)], steps)
    out = sample_path(args, run_dir, f"_cm{steps}.png")
    save_grid(images, out, ncols=min(args.num, 8), scale=args.scale)
    print(f"aigc t2i sample: {args.num} images of {args.prompt!r} (consistency model, {model.f.mode}, {steps} "
          f"step{'s' if steps > 1 else ''}) -> {out}")
    return 0


def nerf_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc nerf`."""
    parser, p = _command_parser(
        "aigc nerf",
        "NeRF in pure PyTorch on a ray-traced scene (spheres on a floor, Blender-format "
        "transforms + PNGs): positional encoding + MLP, stratified + importance sampling, volume rendering; "
        "held-out PSNR/SSIM against training time.",
        NERF_CHAINS, "runs/nerf",
        "render", "render a trained NeRF (or --gsplat: the Gaussians) from a pose (PNG) or round the scene (GIF)",
        "Render the fields of a finished `aigc nerf train` (or, with --gsplat, the 3D Gaussians of `aigc nerf "
        "gsplat`) from a camera pose, or a turntable GIF.",
    )
    p.add_argument("--gsplat", action="store_true",
                   help="render the 3D Gaussian splatting model of `aigc nerf gsplat` instead of the NeRF")
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


def pose_values(text: str) -> list[float]:
    """Return the numbers of a --pose: 2 or 3 (AZIMUTH,ELEVATION[,RADIUS]) or 16; raise ValueError otherwise."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--pose {text!r}: expected comma-separated numbers, AZIMUTH,ELEVATION[,RADIUS] "
                         "or 16 of a 4x4 matrix") from None
    if len(values) not in (2, 3, 16):
        raise ValueError(f"--pose: expected AZIMUTH,ELEVATION[,RADIUS] or 16 numbers, got {len(values)} numbers")
    return values


def parse_pose(text: str, radius: float):
    """Return a 4×4 camera-to-world matrix from 'az,el[,r]' (degrees) or 16 row-major numbers."""
    import numpy as np

    from multimodal.nerf_scene import orbit_pose

    values = pose_values(text)
    if len(values) == 16:
        return np.array(values, dtype=np.float32).reshape(4, 4)
    return orbit_pose(values[0], values[1], values[2] if len(values) == 3 else radius)


def nerf_main(argv: list[str]) -> int:
    """Run `aigc nerf`; return the exit code."""
    args = nerf_parser().parse_args(argv)
    code = run_stage_command(args, NERF_CHAINS)
    if code is not None:
        return code
    if not args.turntable:
        try:
            pose_values(args.pose)  # a bad pose is refused before anything loads
        except ValueError as exc:
            print(f"aigc nerf render: {exc}", file=sys.stderr)
            return 2
    run_dir = Path(args.run_dir)
    stage, command = ("nerf_gsplat", "gsplat") if args.gsplat else ("nerf_train", "train")
    if not (run_dir / stage / "model").is_dir():
        print(f"aigc nerf render: no trained {'Gaussians' if args.gsplat else 'NeRF'} in {run_dir}: run "
              f"`aigc nerf {command} --run-dir {run_dir}` first", file=sys.stderr)
        return 2
    import torch

    from multimodal.pictures import save_gif, save_grid

    torch.set_num_threads(1)
    render_at, around, render = nerf_renderer(run_dir / stage, args.gsplat, args.device)
    if args.turntable:
        out = Path(args.out) if args.out else run_dir / "turntable.gif"
        save_gif(around(args.turntable), out, scale=args.scale)
        print(f"aigc nerf render: {args.turntable} frames -> {out}")
        return 0
    try:
        c2w = parse_pose(args.pose, render["radius"])
    except ValueError as exc:
        print(f"aigc nerf render: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else run_dir / "render.png"
    save_grid(render_at(c2w)[None], out, ncols=1, scale=args.scale)
    position = ", ".join(f"{v:.2f}" for v in c2w[:3, 3])
    print(f"aigc nerf render: camera at ({position}), {math.degrees(2 * math.atan(0.5 * render['image_size'] / render['focal'])):.0f}° "
          f"field of view -> {out}")
    return 0


def nerf_renderer(stage_dir: Path, gsplat: bool, device: str):
    """Return (render one pose -> image (H, W, 3), render N turntable frames -> (N, H, W, 3), the render settings
    with radius, image_size and focal) of a trained nerf_train (NeRF) or nerf_gsplat (Gaussians) stage."""
    if gsplat:
        from multimodal import gsplat_train

        cloud, meta = gsplat_train.load_model(stage_dir)
        return (lambda c2w: gsplat_train.render_pose(cloud, meta, c2w),
                lambda frames: gsplat_train.turntable(cloud, meta, frames), meta)
    from multimodal.nerf_model import load_nerf
    from multimodal.nerf_train import MODEL_DIR, render_pose, turntable

    coarse, fine, render = load_nerf(stage_dir / MODEL_DIR, device)
    return (lambda c2w: render_pose(coarse, fine, render, c2w),
            lambda frames: turntable(coarse, fine, render, frames), render)


# ---------------------------------------------------------------- aigc zoo


def zoo_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc zoo`: `list`, and `RECIPE train|sample` per registered zoo recipe."""
    from multimodal.zoo.registry import RECIPES

    parser = argparse.ArgumentParser(
        prog="aigc zoo",
        description="The generative-model zoo: one registered stage zoo_RECIPE per model, trained on the t2i "
        "caption set's train split (t2i_data -> zoo_RECIPE) and scored on its test split with the family's "
        "metric (bits/dim, reconstruction PSNR, the judge's FID-like distance and accuracy).",
        epilog="recipes: " + ", ".join(RECIPES))
    sub = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    sub.add_parser("list", help="list the recipes: family, stage, key metrics")
    for recipe in RECIPES.values():
        p = sub.add_parser(recipe.name, help=f"{recipe.family}: {recipe.describe()}")
        commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
        t = commands.add_parser(
            "train", help=f"run t2i_data -> {recipe.stage} (finished stages are skipped)",
            description=f"Run t2i_data -> {recipe.stage} through NeMo-Run under the stage contract: each stage "
            "writes <run-dir>/<stage>/ with a manifest.json and is skipped when its fingerprint is unchanged. "
            f"A bare key=value sets {recipe.stage}'s setting; qualify others (t2i_data.key=value).",
            epilog="settings:\n" + _settings(recipe.stage), formatter_class=argparse.RawDescriptionHelpFormatter)
        add_run_options(t, "runs/zoo")
        s = commands.add_parser("sample", help="generate images from a trained run, as a PNG grid",
                                description=f"Generate --num images with the model of a finished `aigc zoo "
                                f"{recipe.name} train`, written as one PNG grid.")
        s.add_argument("--run-dir", default="runs/zoo", help="run directory of the training (default: %(default)s)")
        s.add_argument("--num", type=int, default=16, help="images to generate (default: %(default)s)")
        s.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        s.add_argument("--temperature", type=float, default=None, help="sampling temperature (flows; default: "
                       "the recipe's)")
        s.add_argument("--label", type=int, default=None, help="class id 0..21 (conditional models)")
        s.add_argument("--out", default=None, help="PNG to write (default: <run-dir>/samples/<recipe>.png)")
        s.add_argument("--scale", type=int, default=4, help="pixel enlargement of the grid (default: %(default)s)")
    return parser


def zoo_list() -> str:
    """Return the `aigc zoo list` table: recipe, family, stage, key metrics, description."""
    from multimodal.zoo.registry import RECIPES

    rows = [("recipe", "family", "key metrics", "model")]
    rows += [(r.name, r.family, ", ".join(r.key_metrics), r.describe()) for r in RECIPES.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)


def zoo_main(argv: list[str]) -> int:
    """Run `aigc zoo`; return the exit code."""
    from multimodal.zoo.registry import RECIPES

    args = zoo_parser().parse_args(argv)
    if args.recipe == "list":
        print(zoo_list())
        return 0
    recipe = RECIPES[args.recipe]
    if args.command == "train":
        return _run_stage(args, recipe.stage, recipe.stage)
    stage_dir = Path(args.run_dir) / recipe.stage
    if not (stage_dir / "manifest.json").is_file():
        print(f"aigc zoo {recipe.name} sample: no trained {recipe.name} in {args.run_dir}: run "
              f"`aigc zoo {recipe.name} train --run-dir {args.run_dir}` first", file=sys.stderr)
        return 2
    import torch

    from multimodal.zoo.common import save_samples

    torch.set_num_threads(1)
    options = {k: v for k, v in (("temperature", args.temperature), ("label", args.label)) if v is not None}
    try:
        images = recipe.load_sample()(stage_dir, args.num, args.seed, **options)
    except (TypeError, ValueError) as exc:
        print(f"aigc zoo {recipe.name} sample: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples" / f"{recipe.name}.png"
    save_samples(images, out, ncols=min(args.num, 8), scale=args.scale)
    print(f"aigc zoo {recipe.name} sample: {args.num} images (seed {args.seed}"
          + "".join(f", {k} {v:g}" for k, v in options.items()) + f") -> {out}")
    return 0


# ---------------------------------------------------------------- aigc video


def video_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `aigc video`: data | train | sample PROMPT."""
    parser, p = _command_parser(
        "aigc video",
        "Text-to-video diffusion: captioned clips of a shape or digit moving in a straight line, a text encoder + "
        "factorised space-time denoiser (per-frame 2-D layers, temporal attention across frames) trained by DDPM "
        "with prompt dropout in pixel space, sampled by DDIM with classifier-free guidance; measured by a "
        "per-frame judge, the motion of the object's centroid and the frames' consistency.",
        ("video",), "runs/video",
        "sample", "generate clips for a prompt from a trained run, as an animated GIF grid",
        "Generate --num clips for PROMPT (seeds --seed, --seed+1, ...) with the model of a finished "
        "`aigc video train`, written as one animated GIF.",
    )
    p.add_argument("prompt", help='caption, e.g. "a red circle moving right" or "a handwritten three moving up"')
    p.add_argument("--run-dir", default="runs/video", help="run directory of `aigc video train` (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (default: %(default)s)")
    add_sample_options(p, "clip", 4, "GIF")
    return parser


def video_main(argv: list[str]) -> int:
    """Run `aigc video`; return the exit code."""
    args = video_parser().parse_args(argv)
    code = run_stage_command(args, ("video",))
    if code is not None:
        return code
    run_dir = Path(args.run_dir)
    train_dir = run_dir / "video_train"
    if not (train_dir / "manifest.json").is_file():
        print(f"aigc video sample: no trained model in {run_dir}: run `aigc video train --run-dir {run_dir}` first",
              file=sys.stderr)
        return 2
    import torch

    from multimodal.video_data import save_clip_grid
    from multimodal.video_model import VideoModel

    torch.set_num_threads(1)
    model = VideoModel.load(train_dir, args.device)
    unknown = model.tokenizer.unknown_words(args.prompt)
    if unknown:
        print(f"aigc video sample: not in the training vocabulary (ignored): {', '.join(unknown)}", file=sys.stderr)
    clips = model.generate([args.prompt] * args.num, [args.seed + i for i in range(args.num)], args.steps,
                           args.guidance)
    out = sample_path(args, run_dir, ".gif")
    save_clip_grid(clips, out, ncols=min(args.num, 4), scale=args.scale)
    print(f"aigc video sample: {args.num} clips of {clips.shape[1]} frames of {args.prompt!r} (DDIM {args.steps} "
          f"steps, guidance {args.guidance:g}) -> {out}")
    return 0
