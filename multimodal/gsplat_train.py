"""The `nerf_gsplat` stage: 3D Gaussian splatting fitted to nerf_data's training views, measured on its held-out views.

Initialisation: `init_points` Gaussians at uniform random positions in a box, with
no use of the scene's geometry: the box is centred on the point nearest to every
training camera's optical axis (least squares) and its half-width is half the
data's ray range (far − near)/2, the same bound the NeRF's sampling uses. Colours
start grey (SH = 0), opacities at 0.1, isotropic scales at the mean distance to
the 3 nearest neighbours, identity rotations.

Each step renders one random training view (multimodal/gsplat_render.py) and
takes an Adam step on the L1 photometric loss, one parameter group per field with
the reference implementation's learning rates (means: `lr_means` × scene extent,
decaying exponentially to 1 %). Densification every `densify_every` steps in
[densify_from, densify_until): Gaussians whose view-space (NDC) mean gradient,
averaged over the views that saw them, exceeds `grad_threshold` are cloned when
small (max scale ≤ percent_dense × extent) or split into two samples of
themselves at scale / 1.6 when large; Gaussians with opacity < `min_opacity`, or
larger than 0.1 × extent in the world or `max_screen_px` on screen, are pruned.
Opacities are reset to ≤ 0.01 every `reset_every` steps. The gradient statistics
cover the last `densify_every` steps (reset at each multiple), so a checkpoint —
every `eval_every` steps, a multiple — holds all the loop's state (Gaussians of
any count, Adam moments, RNG), and a killed run resumes to the uninterrupted
result. The SH degree is fixed from the start (the reference raises it
every 1,000 steps, longer than these runs).

Outputs: the Gaussians (safetensors + JSON), held-out renders next to ground
truth, the PSNR-vs-time curve and a turntable GIF like nerf_train's.
"""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from multimodal.figures import print_figures
from multimodal.gsplat_render import GaussianCloud, load_cloud, quat_to_rotmat, render, save_cloud
from multimodal.image_metrics import psnr, ssim
from multimodal.nerf_scene import BACKGROUND, orbit_pose, read_split
from multimodal.nerf_train import TURNTABLE_ELEVATION
from multimodal.pictures import save_gif, save_grid, save_line_plot
from pipeline.stage import StageContext, StageResult
from recipes.loop_checkpoint import LoopCheckpoints, latest, resume_with_generator, save_with_generator

CHECKPOINTS = "checkpoints"  # step_<n>/ (recipes.loop_checkpoint), deleted at the end
MODEL_DIR = "model"
STATS = ("grad_sum", "seen", "max_radius")  # densification statistics per Gaussian


def scene_frame(poses: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the point nearest to every camera's optical axis (least squares) and the scene extent
    (1.1 × the largest camera distance from it, as the reference implementation's camera extent)."""
    centres, axes = poses[:, :3, 3], -poses[:, :3, 2]  # OpenGL cameras look down −z
    eye = np.eye(3)
    proj = eye[None] - axes[:, :, None] * axes[:, None, :]  # (V, 3, 3) projections off each axis
    centre = np.linalg.solve(proj.sum(0), (proj @ centres[:, :, None]).sum(0))[:, 0]
    return centre, 1.1 * float(np.linalg.norm(centres - centre, axis=1).max())


def init_cloud(n: int, sh_degree: int, centre: np.ndarray, half_width: float,
               gen: torch.Generator) -> GaussianCloud:
    """Return `n` Gaussians uniform in the cube centre ± half_width: grey, opacity 0.1, isotropic."""
    cloud = GaussianCloud(n, sh_degree)
    means = torch.tensor(centre, dtype=torch.float32) + half_width * (2 * torch.rand(n, 3, generator=gen) - 1)
    dist = torch.cdist(means, means)
    dist.fill_diagonal_(math.inf)
    knn = dist.topk(3, largest=False).values.mean(1)  # mean distance to the 3 nearest neighbours
    values = cloud.tensors()
    values.update(means=means, log_scales=knn.log()[:, None].repeat(1, 3),
                  quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
                  opacity_logits=torch.full((n,), math.log(0.1 / 0.9)))
    cloud.set_tensors({k: v.detach() for k, v in values.items()})
    return cloud


def make_optimizer(cloud: GaussianCloud, cfg, extent: float) -> torch.optim.Adam:
    """Return Adam with one named group per field at its learning rate."""
    lrs = {"means": cfg.lr_means * extent, "log_scales": cfg.lr_scales, "quats": cfg.lr_quats,
           "opacity_logits": cfg.lr_opacity, "sh_dc": cfg.lr_sh, "sh_rest": cfg.lr_sh / 20}
    return torch.optim.Adam([{"params": [p], "lr": lrs[f], "name": f} for f, p in cloud.tensors().items()],
                            lr=cfg.lr_sh, eps=1e-15)


def edit_cloud(cloud: GaussianCloud, opt: torch.optim.Adam, keep: torch.Tensor, new: dict[str, torch.Tensor]) -> None:
    """Keep the Gaussians where `keep` and append the rows `new[field]`, in the model and in Adam's state
    (kept moments stay, new ones start at zero)."""
    for group in opt.param_groups:
        field, old = group["name"], group["params"][0]
        param = torch.nn.Parameter(torch.cat([old.detach()[keep], new[field]]))
        state = opt.state.pop(old, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.cat([state[key][keep], torch.zeros_like(new[field])])
            opt.state[param] = state
        group["params"] = [param]
        setattr(cloud, field, param)


def densify_and_prune(cloud: GaussianCloud, opt: torch.optim.Adam, stats: dict[str, torch.Tensor], cfg,
                      extent: float, prune_big: bool, gen: torch.Generator) -> dict[str, int]:
    """Clone small and split large Gaussians of high view-space gradient, prune transparent and oversized ones;
    return the counts of each."""
    with torch.no_grad():
        values = {f: t.detach() for f, t in cloud.tensors().items()}
        avg = stats["grad_sum"] / stats["seen"].clamp(min=1)
        grow = avg >= cfg.grad_threshold
        room = max(cfg.max_gaussians - len(cloud), 0)
        if int(grow.sum()) > room:  # keep the highest gradients within the budget
            top = avg.topk(room).indices
            grow = torch.zeros_like(grow)
            grow[top] = True
        scale = values["log_scales"].exp().max(1).values
        clone = grow & (scale <= cfg.percent_dense * extent)
        split = grow & ~clone
        new = {f: torch.cat([v[clone], v[split], v[split]]) for f, v in values.items()}
        s = values["log_scales"][split].exp()  # (S, 3)
        rot = quat_to_rotmat(values["quats"][split])
        offsets = [(rot @ (s * torch.randn(s.shape, generator=gen))[:, :, None])[:, :, 0] for _ in range(2)]
        n_clone, n_split = int(clone.sum()), int(split.sum())
        new["means"][n_clone:] += torch.cat(offsets)
        new["log_scales"][n_clone:] -= math.log(1.6)
        opacity = torch.sigmoid(torch.cat([values["opacity_logits"], new["opacity_logits"]]))
        prune = opacity < cfg.min_opacity
        if prune_big:
            big = torch.cat([values["log_scales"], new["log_scales"]]).exp().max(1).values > 0.1 * extent
            wide = torch.cat([stats["max_radius"], torch.zeros(len(new["means"]))]) > cfg.max_screen_px
            prune |= big | wide
        prune[: len(cloud)] |= split  # a split Gaussian is replaced by its two samples
        n = len(cloud)
        edit_cloud(cloud, opt, torch.ones(n, dtype=torch.bool), new)
        edit_cloud(cloud, opt, ~prune, {f: v[:0] for f, v in new.items()})
    return {"cloned": n_clone, "split": n_split, "pruned": int(prune.sum()) - n_split}


def reset_opacity(cloud: GaussianCloud, opt: torch.optim.Adam) -> None:
    """Clamp every opacity to ≤ 0.01 and zero its Adam moments (the reference's periodic reset)."""
    with torch.no_grad():
        cloud.opacity_logits.clamp_(max=math.log(0.01 / 0.99))
    state = opt.state.get(cloud.opacity_logits)
    if state:
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()


def fresh_stats(n: int) -> dict[str, torch.Tensor]:
    """Return zeroed densification statistics for `n` Gaussians."""
    return {k: torch.zeros(n) for k in STATS}


def render_pose(cloud: GaussianCloud, meta: dict, c2w: np.ndarray) -> np.ndarray:
    """Return the image (H, W, 3) in [0, 1] the Gaussians render from camera-to-world pose `c2w`."""
    with torch.no_grad():
        out = render(cloud, torch.tensor(c2w, dtype=torch.float32), meta["image_size"], meta["image_size"],
                     meta["focal"], meta["background"], meta["tile"])
    return out["image"].clamp(0, 1).numpy()


def evaluate(cloud: GaussianCloud, meta: dict, poses: np.ndarray, images: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Return mean PSNR, mean SSIM over held-out views, render frames per second and the renders (V, H, W, 3)."""
    tick = time.perf_counter()
    preds = np.stack([render_pose(cloud, meta, p) for p in poses])
    fps = len(poses) / max(time.perf_counter() - tick, 1e-9)
    scores = [(psnr(torch.tensor(p), torch.tensor(t)), ssim(torch.tensor(p), torch.tensor(t)))
              for p, t in zip(preds, images)]
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores])), fps, preds


def turntable(cloud: GaussianCloud, meta: dict, frames: int) -> np.ndarray:
    """Return frames (N, H, W, 3) rendered round the scene at nerf_train's turntable elevation."""
    return np.stack([render_pose(cloud, meta, orbit_pose(360.0 * k / frames, TURNTABLE_ELEVATION, meta["radius"]))
                     for k in range(frames)])


def resume_count(root) -> int | None:
    """Return the number of Gaussians in the newest checkpoint under `root` (None where there is none)."""
    path = latest(root)
    if path is None:
        return None
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        return f.get_slice("gaussians/means").get_shape()[0]


def run(ctx: StageContext) -> StageResult:
    """Fit the Gaussians, write them and the pictures; return held-out PSNR/SSIM, frames/s and the curve."""
    cfg = ctx.config
    if cfg.eval_every % cfg.densify_every:
        raise ValueError(f"nerf_gsplat.eval_every ({cfg.eval_every}) must be a multiple of densify_every "
                         f"({cfg.densify_every}): checkpoints fall where the densification statistics are empty")
    torch.manual_seed(ctx.seed)
    data_dir = ctx.input_path("nerf_data", "train").parent
    train_img, train_pose, meta_in = read_split(data_dir, "train")
    test_img, test_pose, _ = read_split(data_dir, "test")
    size, focal = meta_in["w"], meta_in["fl_x"]
    centre, extent = scene_frame(train_pose)
    meta = {"image_size": size, "focal": focal, "background": BACKGROUND, "tile": cfg.tile,
            "radius": float(np.linalg.norm(train_pose[0, :3, 3] - centre)), "centre": centre.tolist(),
            "extent": extent}
    images = torch.tensor(train_img)  # (V, H, W, 3)
    poses = torch.tensor(train_pose)

    gen = torch.Generator().manual_seed(ctx.seed)
    checkpoints = LoopCheckpoints(ctx.out_dir / CHECKPOINTS, every=cfg.eval_every, keep=1)
    cloud = init_cloud(cfg.init_points, cfg.sh_degree, centre, (meta_in["far"] - meta_in["near"]) / 2, gen)
    count = resume_count(checkpoints.root)
    if count is not None:  # size the model to the checkpoint's Gaussians before loading them
        cloud = GaussianCloud(count, cfg.sh_degree)
    opt = make_optimizer(cloud, cfg, extent)
    start, state = resume_with_generator(checkpoints, {"gaussians": cloud}, {"adam": opt}, gen)
    curve, train_s, cpu_s = state.get("curve", []), state.get("train_s", 0.0), state.get("cpu_s", 0.0)
    events = state.get("densify", {"cloned": 0, "split": 0, "pruned": 0})
    if start:
        print(f"[nerf_gsplat] resuming at step {start} with {len(cloud)} Gaussians", flush=True)
    stats = fresh_stats(len(cloud))

    mean_colour = torch.tensor(train_img.mean((0, 1, 2)))  # (3,): the best constant image
    base_psnr = float(np.mean([psnr(mean_colour.expand(t.shape), torch.tensor(t)) for t in test_img]))
    lr_means = cfg.lr_means * extent
    decay = 0.01 ** (1.0 / max(1, cfg.steps))
    bar = tqdm(total=cfg.steps, initial=start, desc="nerf_gsplat")
    tick, cpu_tick = time.time(), time.process_time()
    for step in range(start, cfg.steps):
        view = int(torch.randint(0, len(images), (1,), generator=gen))
        out = render(cloud, poses[view], size, size, focal, BACKGROUND, cfg.tile)
        loss = (out["image"] - images[view]).abs().mean()
        opt.param_groups[0]["lr"] = lr_means * decay ** step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # view-space gradient in NDC units (pixels × size/2), as the reference
            seen = out["radii"] > 0
            grad = out["means2d"].grad * (size / 2)
            stats["grad_sum"] += torch.where(seen, grad.norm(dim=-1), torch.zeros_like(out["radii"]))
            stats["seen"] += seen.float()
            stats["max_radius"] = torch.maximum(stats["max_radius"], out["radii"])
        done = step + 1
        if done % cfg.densify_every == 0:
            if cfg.densify_from <= done < cfg.densify_until:
                changed = densify_and_prune(cloud, opt, stats, cfg, extent, done > cfg.reset_every > 0, gen)
                events = {k: events[k] + v for k, v in changed.items()}
            if cfg.reset_every and done % cfg.reset_every == 0 and done < cfg.densify_until:
                reset_opacity(cloud, opt)
            stats = fresh_stats(len(cloud))
        bar.update()
        if done % cfg.eval_every == 0 or done == cfg.steps:
            train_s += time.time() - tick
            cpu_s += time.process_time() - cpu_tick
            p, s, _, _ = evaluate(cloud, meta, test_pose, test_img)
            curve.append([done, round(train_s, 2), round(cpu_s, 2), round(p, 3), round(s, 4), len(cloud)])
            bar.set_postfix(test_psnr=f"{p:.2f}", gaussians=len(cloud), train_s=f"{train_s:.0f}")
            save_with_generator(checkpoints, done, {"gaussians": cloud}, {"adam": opt}, gen,
                                {"curve": curve, "train_s": train_s, "cpu_s": cpu_s, "densify": events})
            tick, cpu_tick = time.time(), time.process_time()
    bar.close()

    save_cloud(ctx.out_dir / MODEL_DIR, cloud, meta)
    shutil.rmtree(ctx.out_dir / CHECKPOINTS, ignore_errors=True)
    test_psnr, test_ssim, fps, preds = evaluate(cloud, meta, test_pose, test_img)
    save_grid(np.concatenate([test_img, preds]), ctx.out_dir / "test_views.png", ncols=len(test_img), scale=2)
    for k, pred in enumerate(preds):
        save_grid(pred[None], ctx.out_dir / "renders" / f"test_{k}.png", ncols=1)
    save_gif(turntable(cloud, meta, cfg.turntable_frames), ctx.out_dir / "turntable.gif", scale=2)
    save_line_plot({"held-out PSNR (dB)": [(c[1], c[3]) for c in curve]}, ctx.out_dir / "psnr_curve.png",
                   "3DGS held-out PSNR vs training time", "training seconds (wall clock)")
    metrics = {
        "gaussians": len(cloud),
        "steps": cfg.steps,
        **events,
        "train_s": round(train_s, 1),
        "train_cpu_s": round(cpu_s, 1),
        "render_frames_per_s": round(fps, 2),
        "test_psnr": round(test_psnr, 2),
        "test_ssim": round(test_ssim, 4),
        "mean_colour_psnr": round(base_psnr, 2),
        "curve": curve,
    }
    (ctx.out_dir / "curve.json").write_text(json.dumps(
        {"columns": ["step", "train_s", "train_cpu_s", "psnr", "ssim", "gaussians"], "rows": curve}, indent=1) + "\n")
    print_figures("nerf_gsplat: held-out views", metrics, [
        (f"step {int(step)} @ {secs:.0f}s ({cpu:.0f} CPU s)", f"PSNR {p:.2f} dB · SSIM {s:.3f} · {n} G")
        for step, secs, cpu, p, s, n in curve])
    return StageResult(
        outputs={"model": MODEL_DIR, "test_views": "test_views.png", "renders": "renders",
                 "turntable": "turntable.gif", "psnr_curve": "psnr_curve.png", "curve": "curve.json"},
        metrics=metrics,
    )


def load_model(stage_dir) -> tuple[GaussianCloud, dict]:
    """Return the trained Gaussians of a finished nerf_gsplat stage directory and their render settings."""
    return load_cloud(stage_dir / MODEL_DIR)
