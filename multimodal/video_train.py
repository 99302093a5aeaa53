"""The `video_train` stage: a text encoder and a factorised space–time denoiser trained together by DDPM
on the `video_data` clips (pixel space), sampled by DDIM with classifier-free guidance, then measured.

Why pixel space: a 16×16 clip of 8 frames is 6,144 numbers, small enough to denoise directly,
and the t2i VAE was trained on large centred objects, not small ones anywhere in the frame; with
no autoencoder the stage needs no upstream training and its errors are the denoiser's own.

Training: each step draws `batch_size` training clips, replaces their caption by the empty
prompt with probability `prompt_dropout` and minimises multimodal.diffusion's loss over the
whole clip (one timestep per clip) against the target of `prediction` (default: the clean
clip, x0-prediction), with a warmup + cosine learning rate;
checkpoints every `checkpoint_every` steps (multimodal.zoo.common.train_loop) let a killed
stage resume to the same weights. At the end: clips generated for every caption prompt are
measured (multimodal.video_metrics) beside the real held-out clips and two trivial baselines
(each real clip's first frame held still; uniform noise), and written as animated GIF grids.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from multimodal.diffusion import diffusion_loss, lr_factor, make_train_scheduler
from multimodal.figures import print_figures
from multimodal.pictures import save_line_plot
from multimodal.t2i_judge import build_judge
from multimodal.text_encoder import TextEncoder, WordTokenizer
from multimodal.video_data import DIRECTIONS, as_frames, prompts, read_clips, save_clip_grid, save_filmstrip
from multimodal.video_metrics import clip_figures, motion_figures
from multimodal.video_model import DENOISER_DIR, SCHEDULER_DIR, TEXT_DIR, VideoDenoiser, VideoModel
from multimodal.zoo.common import CHECKPOINTS, final_loss, train_loop
from pipeline.stage import StageContext, StageResult

GRID = ((3, "right"), (7, "up"), (10, "left"), (11, "down"), (15, "right"), (17, "up"), (19, "left"), (21, "down"))
GRID_SEEDS = 4


def frame_judge(data: dict, train_frames: int, per_class: int, seed: int):
    """Return multimodal.t2i_judge's judge fitted on `train_frames` frames of the training clips (a sample),
    tested on the frames of the held-out clips, with a class-balanced real reference of `per_class` frames per
    class. NumPy's BLAS runs on one thread (on a shared 2-core machine more threads ran the MLP slower)."""
    n, frames = data["clips"].shape[:2]
    images = data["clips"].reshape(n * frames, *data["clips"].shape[2:])  # (N·T, 3, F, F)
    labels, split = np.repeat(data["labels"], frames), np.repeat(data["split"], frames)
    train = np.flatnonzero(split == 0)
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(train, min(len(train), train_frames), replace=False),
                                   np.flatnonzero(split == 1)]))
    with threadpool_limits(1):
        return build_judge({"images": images[keep], "labels": labels[keep], "split": split[keep]}, per_class, seed)


def grid_prompts(digits: bool) -> tuple[list[str], list[int]]:
    """Return the prompts and seeds of the GIF grid: a row of GRID_SEEDS clips per prompt of GRID."""
    rows = [text for c, d, text in prompts(digits) if (c, DIRECTIONS[d]) in GRID]
    return [p for p in rows for _ in range(GRID_SEEDS)], list(range(GRID_SEEDS)) * len(rows)


def measure(model: VideoModel, data: dict, cfg, seed: int) -> tuple[dict, np.ndarray]:
    """Return the figures of clips generated for every caption prompt, the real held-out clips' and the
    baselines', and the generated clips (N, T, H, W, 3)."""
    meta = data["meta"]
    speed, frames = meta["speed"], meta["frames"]
    todo = [(c, d, text) for c, d, text in prompts(meta["digits"]) for _ in range(cfg.eval_per_prompt)]
    classes, directions = np.array([c for c, _, _ in todo]), np.array([d for _, d, _ in todo])
    judge = frame_judge(data, cfg.judge_frames, cfg.eval_per_prompt * len(DIRECTIONS) * frames, seed)
    started = time.time()
    clips = model.generate([text for _, _, text in todo], [10_000 + i for i in range(len(todo))],
                           cfg.sample_steps, cfg.guidance)
    sample_s = time.time() - started
    test = data["split"] == 1
    real = as_frames(data["clips"][test])
    real_classes, real_dirs = data["labels"][test], data["directions"][test]
    static = np.repeat(real[:, :1], frames, axis=1)  # the first frame held still
    noise = np.random.default_rng(seed).random(real.shape)
    generated = clip_figures(judge, clips, classes, directions, speed)
    real_f = clip_figures(judge, real, real_classes, real_dirs, speed)
    static_f = clip_figures(judge, static, real_classes, real_dirs, speed)
    noise_f = clip_figures(judge, noise, real_classes, real_dirs, speed)
    per_direction = {DIRECTIONS[d]: round(motion_figures(clips[directions == d], directions[directions == d])
                                          ["motion_accuracy"], 4) for d in range(len(DIRECTIONS))}
    figures = {
        "judge_real_test_accuracy": round(judge.real_test_accuracy, 4),
        "fid_like_real_floor": round(judge.floor, 3),
        **{k: round(v, 4) for k, v in generated.items() if v is not None},
        **{f"real_{k}": round(real_f[k], 4) for k in ("motion_accuracy", "frame_difference", "warp_error",
                                                       "identity_consistency", "class_accuracy")},
        "static_motion_accuracy": round(static_f["motion_accuracy"], 4),
        "static_warp_error": round(static_f["warp_error"], 4),
        "noise_class_accuracy": round(noise_f["class_accuracy"], 4),
        "noise_fid_like": round(noise_f["fid_like"], 3),
        "eval_clips": len(todo),
        "clips_per_s": round(len(todo) / max(sample_s, 1e-9), 2),
        "motion_accuracy_per_direction": per_direction,
    }
    return figures, clips


def run(ctx: StageContext) -> StageResult:
    """Train text encoder + space–time denoiser on the training clips, write them, the GIFs and the figures."""
    cfg = ctx.config
    device = cfg.device
    torch.manual_seed(ctx.seed)
    data = read_clips(ctx.input_path("video_data", "clips").parent)
    meta = data["meta"]
    keep = data["split"] == 0
    clips = torch.from_numpy(data["clips"][keep]).float() / 127.5 - 1.0  # (N, T, 3, F, F) in [-1, 1]
    captions = [c for c, k in zip(data["captions"], keep) if k]
    tokenizer = WordTokenizer.fit(data["captions"] + [""])
    ids, mask = tokenizer(captions)  # (N, L) each
    null_ids, null_mask = tokenizer([""])  # (1, L)

    text = TextEncoder(len(tokenizer.vocab), tokenizer.max_length, cfg.text_dim, cfg.text_layers,
                       cfg.text_heads).to(device)
    denoiser = VideoDenoiser(tuple(cfg.channels), cfg.temporal, cfg.heads, cfg.text_dim, meta["frames"],
                             frame_size=meta["frame_size"]).to(device)
    scheduler = make_train_scheduler(cfg.train_timesteps, cfg.beta_schedule, cfg.prediction)
    params = list(denoiser.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(ctx.seed)
    batch = min(cfg.batch_size, len(ids))

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        drop = (torch.rand(batch, generator=gen) < cfg.prompt_dropout)[:, None]  # (B, 1)
        b_ids = torch.where(drop, null_ids, ids[idx]).to(device)
        b_mask = torch.where(drop, null_mask, mask[idx]).to(device)
        loss = diffusion_loss(denoiser, scheduler, clips[idx].to(device), text(b_ids, b_mask), b_mask, gen)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.item()}

    cpu_started = time.process_time()
    log = train_loop(ctx, "video", {"denoiser": denoiser, "text": text}, {"adamw": opt}, cfg.steps, step_fn, gen,
                     cfg.checkpoint_every)
    train_cpu_s = time.process_time() - cpu_started  # this process's share (a resumed run: since the resume)
    model = VideoModel(denoiser, text, tokenizer, scheduler)
    model.save(ctx.out_dir)
    shutil.rmtree(ctx.out_dir / CHECKPOINTS)

    started = time.time()
    quality, generated = measure(model, data, cfg, ctx.seed)
    grid_p, grid_s = grid_prompts(meta["digits"])
    grid = model.generate(grid_p, grid_s, cfg.sample_steps, cfg.guidance)
    eval_s = time.time() - started
    save_clip_grid(grid, ctx.out_dir / "samples" / "generated.gif", GRID_SEEDS)
    save_filmstrip(grid[::GRID_SEEDS], ctx.out_dir / "filmstrip.png")
    test = np.flatnonzero(data["split"] == 1)
    save_clip_grid(as_frames(data["clips"][test[:len(grid)]]), ctx.out_dir / "samples" / "real.gif", GRID_SEEDS)
    history = log["history"]
    window = 50
    smooth = [(s, float(np.mean([r[1] for r in history[max(0, i - window + 1): i + 1]])))
              for i, (s, *_) in enumerate(history)]
    save_line_plot({"loss (moving avg)": smooth}, ctx.out_dir / "loss_curve.png", f"video DDPM loss ({cfg.prediction} MSE)",
                   "step")
    (ctx.out_dir / "quality.json").write_text(json.dumps({**quality, "grid_prompts": grid_p[::GRID_SEEDS]},
                                                         indent=2) + "\n")
    metrics = {
        "temporal": cfg.temporal,
        "prediction": cfg.prediction,
        "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
        "text_params": sum(p.numel() for p in text.parameters()),
        "steps": cfg.steps,
        "final_loss": final_loss(history),
        "train_s": round(log["train_s"], 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "eval_s": round(eval_s, 1),
        "sample_steps": cfg.sample_steps,
        "guidance": cfg.guidance,
        **{k: v for k, v in quality.items() if k != "motion_accuracy_per_direction"},
    }
    print_figures("video_train: space–time diffusion, measured", metrics)
    return StageResult(
        outputs={"denoiser": DENOISER_DIR, "text_encoder": TEXT_DIR, "scheduler": SCHEDULER_DIR,
                 "samples": "samples", "filmstrip": "filmstrip.png", "loss_curve": "loss_curve.png",
                 "quality": "quality.json"},
        metrics=metrics,
    )
