"""The `nerf_train` stage: fit coarse + fine NeRF fields to the training views, measure held-out views.

Each step renders `rays_per_batch` random training rays (stratified coarse
samples, importance samples from the coarse weights, both fields trained on
the photometric MSE). Every `eval_every` steps the held-out views are rendered
and their PSNR/SSIM recorded against training seconds (evaluation time not
counted), with a checkpoint in the work dir from which a killed run resumes.
Outputs: the fields (safetensors), held-out renders next to ground truth, the
PSNR-vs-time curve and a turntable GIF.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from multimodal.figures import print_figures
from multimodal.image_metrics import psnr, ssim
from multimodal.nerf_model import NerfField, render_image, render_rays, save_nerf
from multimodal.nerf_scene import BACKGROUND, TARGET, camera_rays, orbit_pose, read_split
from multimodal.pictures import save_gif, save_grid, save_line_plot
from pipeline.stage import StageContext, StageResult
from recipes.loop_checkpoint import LoopCheckpoints, resume_with_generator, save_with_generator

CHECKPOINTS = "checkpoints"  # step_<n>/ (recipes.loop_checkpoint), deleted at the end
MODEL_DIR = "model"
TURNTABLE_ELEVATION = 30.0


def view_rays(poses: np.ndarray, size: int, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ray origins and directions (V, H, W, 3) of every pose."""
    rays = [camera_rays(torch.tensor(p), size, size, focal) for p in poses]
    return torch.stack([o for o, _ in rays]), torch.stack([d for _, d in rays])


def render_pose(coarse: NerfField, fine: NerfField, render: dict, c2w: np.ndarray) -> np.ndarray:
    """Return the image (H, W, 3) in [0, 1] the fields render from camera-to-world pose `c2w`."""
    device = next(fine.parameters()).device
    o, d = camera_rays(torch.tensor(c2w, dtype=torch.float32), render["image_size"], render["image_size"],
                       render["focal"])
    img = render_image(coarse, fine, o.to(device), d.to(device), render["near"], render["far"],
                       render["coarse_samples"], render["fine_samples"], render["background"])
    return img.cpu().numpy()


def turntable(coarse: NerfField, fine: NerfField, render: dict, frames: int) -> np.ndarray:
    """Return frames (N, H, W, 3) rendered round the scene at a fixed elevation."""
    return np.stack([render_pose(coarse, fine, render, orbit_pose(360.0 * k / frames, TURNTABLE_ELEVATION,
                                                                   render["radius"])) for k in range(frames)])


def evaluate(coarse: NerfField, fine: NerfField, render: dict, poses: np.ndarray, images: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Return mean PSNR, mean SSIM over held-out views and their renders (V, H, W, 3)."""
    preds = np.stack([render_pose(coarse, fine, render, p) for p in poses])
    scores = [(psnr(torch.tensor(p), torch.tensor(t)), ssim(torch.tensor(p), torch.tensor(t)))
              for p, t in zip(preds, images)]
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores])), preds


def run(ctx: StageContext) -> StageResult:
    """Train the fields, write them and the pictures; return held-out PSNR/SSIM and the curve."""
    cfg = ctx.config
    device = cfg.device
    torch.manual_seed(ctx.seed)
    data_dir = ctx.input_path("nerf_data", "train").parent
    train_img, train_pose, meta = read_split(data_dir, "train")
    test_img, test_pose, _ = read_split(data_dir, "test")
    size, focal, near, far = meta["w"], meta["fl_x"], meta["near"], meta["far"]
    render = {"near": near, "far": far, "background": BACKGROUND, "coarse_samples": cfg.coarse_samples,
              "fine_samples": cfg.fine_samples, "image_size": size, "focal": focal,
              "radius": float(np.linalg.norm(train_pose[0, :3, 3] - np.array(TARGET)))}
    origins, dirs = view_rays(train_pose, size, focal)
    origins, dirs = origins.reshape(-1, 3).to(device), dirs.reshape(-1, 3).to(device)
    colours = torch.tensor(train_img).reshape(-1, 3).to(device)  # (V·H·W, 3)

    scale = (far - near) / 2
    coarse = NerfField(cfg.pos_freqs, cfg.dir_freqs, cfg.width, cfg.depth, scale).to(device)
    fine = NerfField(cfg.pos_freqs, cfg.dir_freqs, cfg.width, cfg.depth, scale).to(device)
    params = list(coarse.parameters()) + list(fine.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    decay = (cfg.min_lr / cfg.lr) ** (1.0 / max(1, cfg.steps))
    gen = torch.Generator().manual_seed(ctx.seed)
    # curve: [step, train seconds (wall), train seconds (this process's CPU), psnr, ssim] per evaluation
    checkpoints = LoopCheckpoints(ctx.out_dir / CHECKPOINTS, every=cfg.eval_every, keep=1)
    modules, optimizers = {"coarse": coarse, "fine": fine}, {"adam": opt}
    start, state = resume_with_generator(checkpoints, modules, optimizers, gen)
    curve, train_s, cpu_s = state.get("curve", []), state.get("train_s", 0.0), state.get("cpu_s", 0.0)
    if start:
        print(f"[nerf_train] resuming at step {start}", flush=True)

    mean_colour = torch.tensor(train_img.mean((0, 1, 2)))  # (3,): the best constant image
    base_psnr = float(np.mean([psnr(mean_colour.expand(t.shape), torch.tensor(t)) for t in test_img]))
    bar = tqdm(total=cfg.steps, initial=start, desc="nerf_train")
    tick, cpu_tick = time.time(), time.process_time()
    for step in range(start, cfg.steps):
        idx = torch.randint(0, colours.shape[0], (cfg.rays_per_batch,), generator=gen).to(device)
        out = render_rays(coarse, fine, origins[idx], dirs[idx], near, far, cfg.coarse_samples, cfg.fine_samples,
                          True, BACKGROUND, gen)
        loss = (out["coarse"] - colours[idx]).pow(2).mean() + (out["fine"] - colours[idx]).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * decay ** step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            train_s += time.time() - tick
            cpu_s += time.process_time() - cpu_tick
            p, s, _ = evaluate(coarse, fine, render, test_pose, test_img)
            curve.append([step + 1, round(train_s, 2), round(cpu_s, 2), round(p, 3), round(s, 4)])
            bar.set_postfix(test_psnr=f"{p:.2f}", train_s=f"{train_s:.0f}")
            save_with_generator(checkpoints, step + 1, modules, optimizers, gen,
                                {"curve": curve, "train_s": train_s, "cpu_s": cpu_s})
            tick, cpu_tick = time.time(), time.process_time()
    bar.close()

    save_nerf(ctx.out_dir / MODEL_DIR, coarse, fine, render)
    shutil.rmtree(ctx.out_dir / CHECKPOINTS)
    test_psnr, test_ssim, preds = evaluate(coarse, fine, render, test_pose, test_img)
    save_grid(np.concatenate([test_img, preds]), ctx.out_dir / "test_views.png", ncols=len(test_img), scale=2)
    for k, pred in enumerate(preds):
        save_grid(pred[None], ctx.out_dir / "renders" / f"test_{k}.png", ncols=1)
    frames = turntable(coarse, fine, render, cfg.turntable_frames)
    save_gif(frames, ctx.out_dir / "turntable.gif", scale=2)
    save_line_plot({"held-out PSNR (dB)": [(c[1], c[3]) for c in curve]}, ctx.out_dir / "psnr_curve.png",
                   "NeRF held-out PSNR vs training time", "training seconds (wall clock)")
    reached = [c for c in curve if c[3] >= 25.0]
    metrics = {
        "params": sum(p.numel() for p in params),
        "steps": cfg.steps,
        "train_s": round(train_s, 1),
        "train_cpu_s": round(cpu_s, 1),
        "rays_per_s": round(cfg.steps * cfg.rays_per_batch / max(train_s, 1e-9), 1),
        "test_psnr": round(test_psnr, 2),
        "test_ssim": round(test_ssim, 4),
        "mean_colour_psnr": round(base_psnr, 2),
        "seconds_to_25db": reached[0][1] if reached else None,
        "cpu_seconds_to_25db": reached[0][2] if reached else None,
        "curve": curve,
    }
    (ctx.out_dir / "curve.json").write_text(json.dumps(
        {"columns": ["step", "train_s", "train_cpu_s", "psnr", "ssim"], "rows": curve}, indent=1) + "\n")
    print_figures("nerf_train: held-out views", metrics, [
        (f"step {int(step)} @ {secs:.0f}s ({cpu:.0f} CPU s)", f"PSNR {p:.2f} dB · SSIM {s:.3f}")
        for step, secs, cpu, p, s in curve])
    return StageResult(
        outputs={"model": MODEL_DIR, "test_views": "test_views.png", "renders": "renders",
                 "turntable": "turntable.gif", "psnr_curve": "psnr_curve.png", "curve": "curve.json"},
        metrics=metrics,
    )

