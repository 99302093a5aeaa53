"""The `t2i_train` stage: text encoder + backbone (UNet2DConditionModel or DiT) trained together on VAE
latents by one objective (DDPM, VP/VE score SDE, flow matching), then scored by the judge.

Training: each step encodes a batch of training images with the frozen VAE
(a sample of q(z|x), times its scaling factor), replaces the caption by the
empty prompt with probability `prompt_dropout` (what makes classifier-free
guidance possible), and minimises the objective's regression loss (ε or
velocity MSE, multimodal/objectives.py). After each epoch a grid from fixed
seeds (one row per prompt) goes to samples/epoch_NNN.png and a checkpoint to
the work dir, from which a killed run resumes. At the end: the judge's prompt
accuracy at each guidance scale and an FID-like distance, and the same figures
against the number of network evaluations (quality_vs_nfe.png) over `steps_curve`.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from multimodal.diffusion import build_unet, lr_factor
from multimodal.dit import DiT
from multimodal.figures import print_figures
from multimodal.pictures import save_grid, save_line_plot
from multimodal.t2i_data import class_prompts, read_caption_set
from multimodal.t2i_judge import build_judge, judge_images
from multimodal.objectives import count_nfe, make_schedule, resolve_sampler, training_loss
from multimodal.t2i_model import T2IModel
from multimodal.text_encoder import TextEncoder, WordTokenizer
from multimodal.vae import to_model_range
from pipeline.stage import StageContext, StageResult
from recipes.loop_checkpoint import LoopCheckpoints, resume_with_generator, save_with_generator

CHECKPOINTS = "checkpoints"  # epoch_<n> as step_<n>/ (recipes.loop_checkpoint), deleted at the end
GRID_PROMPTS = (0, 1, 3, 7, 8, 10, 14, 18, 21)  # class ids shown in the per-epoch grids
GRID_SEEDS = 6


@torch.no_grad()
def posterior_stats(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scaled posterior mean and std (N, C, h, w) of images in [-1, 1]."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for s in range(0, len(images), batch_size):
        post = vae.encode(images[s: s + batch_size].to(device)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def grid_prompts_and_seeds(prompts: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Return the per-epoch grid's prompts, seeds (one row per prompt) and row labels."""
    rows = [prompts[c] for c in GRID_PROMPTS if c < len(prompts)]
    return [p for p in rows for _ in range(GRID_SEEDS)], list(range(GRID_SEEDS)) * len(rows), rows


def judge_setting(model: T2IModel, judge, per_prompt: int, steps: int, guidance: float, sampler: str) -> dict:
    """Return the judged figures of `per_prompt` images per class prompt sampled in `steps` steps: digit and
    shape accuracy, FID-like distance, per-class accuracy, network evaluations and images per second."""
    prompts = class_prompts()
    classes = np.repeat(np.arange(len(prompts)), per_prompt)
    seeds = [10_000 + i for i in range(len(classes))]
    started = time.time()
    images = model.generate([prompts[c] for c in classes], seeds, steps, guidance, sampler)
    seconds = time.time() - started
    return {**judge_images(judge, images, classes), "nfe": count_nfe(model.scheduler, sampler, steps),
            "images_per_s": len(images) / max(seconds, 1e-9)}


def score(model: T2IModel, data: dict, cfg, seed: int) -> dict:
    """Return the judge's figures: real accuracy, then prompt accuracy and FID-like distance per guidance scale,
    and `steps_curve`: the same at grid_guidance against the sampler's steps and network evaluations (NFE)."""
    prompts = class_prompts()
    sampler = resolve_sampler(cfg.objective, cfg.sampler)
    judge = build_judge(data, cfg.eval_per_prompt, seed)
    result = {"judge_real_test_accuracy": round(judge.real_test_accuracy, 4),
              "fid_like_real_floor": round(judge.floor, 3), "per_prompt": {}}
    judged = {}  # (steps, guidance) -> figures
    for g in cfg.guidance_scales:
        judged[cfg.sample_steps, g] = j = judge_setting(model, judge, cfg.eval_per_prompt, cfg.sample_steps, g, sampler)
        key = f"g{g:g}"
        result[f"digit_accuracy_{key}"] = round(j["digit_accuracy"], 4)
        result[f"shape_accuracy_{key}"] = round(j["shape_accuracy"], 4)
        result[f"fid_like_{key}"] = round(j["fid_like"], 3)
        result["per_prompt"][key] = {prompts[c]: round(a, 3) for c, a in j["per_class"].items()}
    result["steps_curve"] = []
    for steps in sorted({*cfg.steps_curve, cfg.sample_steps}):
        if (steps, cfg.grid_guidance) not in judged:
            judged[steps, cfg.grid_guidance] = judge_setting(model, judge, cfg.eval_per_prompt, steps,
                                                             cfg.grid_guidance, sampler)
        j = judged[steps, cfg.grid_guidance]
        result["steps_curve"].append({"steps": steps, "nfe": j["nfe"], "guidance": cfg.grid_guidance,
                                      "digit_accuracy": round(j["digit_accuracy"], 4),
                                      "shape_accuracy": round(j["shape_accuracy"], 4),
                                      "fid_like": round(j["fid_like"], 3), "images_per_s": round(j["images_per_s"], 1)})
    return result


def build_backbone(cfg, latent_size: int, latent_channels: int) -> torch.nn.Module:
    """Return the untrained backbone named by `cfg.backbone`: the UNet2DConditionModel or the DiT."""
    if cfg.backbone == "unet":
        return build_unet(latent_size, latent_channels, tuple(cfg.unet_channels), cfg.text_dim, cfg.pooled_text)
    if cfg.backbone == "dit":
        return DiT(sample_size=latent_size, in_channels=latent_channels, patch_size=cfg.dit_patch, width=cfg.dit_width,
                   depth=cfg.dit_depth, heads=cfg.dit_heads, text_dim=cfg.text_dim)
    raise ValueError(f"unknown backbone {cfg.backbone!r}; choose unet or dit")


def save_quality_plots(curve: list[dict], out_dir, label: str) -> None:
    """Write quality_vs_nfe.png (judge accuracy) and fid_vs_nfe.png (FID-like) against network evaluations."""
    save_line_plot({"digit accuracy": [(p["nfe"], p["digit_accuracy"]) for p in curve],
                    "shape accuracy": [(p["nfe"], p["shape_accuracy"]) for p in curve]},
                   out_dir / "quality_vs_nfe.png", f"{label}: judge accuracy vs NFE", "network evaluations (NFE)")
    save_line_plot({"FID-like": [(p["nfe"], p["fid_like"]) for p in curve]},
                   out_dir / "fid_vs_nfe.png", f"{label}: FID-like vs NFE", "network evaluations (NFE)")


def run(ctx: StageContext) -> StageResult:
    """Train text encoder + UNet on the VAE latents, write them, the grids and the judge's figures."""
    cfg = ctx.config
    device = cfg.device
    torch.manual_seed(ctx.seed)
    data = read_caption_set(ctx.input_path("t2i_data", "dataset").parent)
    vae = AutoencoderKL.from_pretrained(ctx.input_path("t2i_vae", "vae")).to(device).eval()
    keep = data["split"] == 0
    captions = [c for c, k in zip(data["captions"], keep) if k]
    mean, std = posterior_stats(vae, to_model_range(data["images"][keep]))  # (N, C, h, w) each
    tokenizer = WordTokenizer.fit(data["captions"] + class_prompts())
    ids, mask = tokenizer(captions)  # (N, L) each
    null_ids, null_mask = tokenizer([""])  # (1, L)

    sampler = resolve_sampler(cfg.objective, cfg.sampler)  # fails early on a sampler the objective lacks
    text = TextEncoder(len(tokenizer.vocab), tokenizer.max_length, cfg.text_dim, cfg.text_layers, cfg.text_heads)
    unet = build_backbone(cfg, mean.shape[-1], mean.shape[1])
    text, unet = text.to(device), unet.to(device)
    scheduler = make_schedule(cfg.objective, cfg.train_timesteps, cfg.beta_schedule)
    model = T2IModel(vae, unet, text, tokenizer, scheduler)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters()), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(ctx.seed)
    batch = min(cfg.batch_size, len(ids))
    steps_per_epoch = len(ids) // batch
    total = steps_per_epoch * cfg.epochs
    checkpoints = LoopCheckpoints(ctx.out_dir / CHECKPOINTS, every=1, keep=1)  # one per epoch
    modules, optimizers = {"unet": unet, "text": text}, {"adamw": opt}
    start_epoch, state = resume_with_generator(checkpoints, modules, optimizers, gen)
    history = [(int(s), float(v)) for s, v in state.get("history", [])]  # (step, loss)
    train_s, cpu_s = state.get("train_s", 0.0), state.get("cpu_s", 0.0)
    if start_epoch:
        print(f"[t2i_train] resuming after epoch {start_epoch}", flush=True)

    denoise = model.denoiser()
    grid_p, grid_s, grid_rows = grid_prompts_and_seeds(class_prompts())
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="t2i_train")
    for epoch in range(start_epoch, cfg.epochs):
        started, cpu_started = time.time(), time.process_time()
        unet.train()
        text.train()
        order = torch.randperm(len(ids), generator=gen)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            idx = order[i * batch: (i + 1) * batch]
            z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)  # (B, C, h, w)
            drop = (torch.rand(batch, generator=gen) < cfg.prompt_dropout)[:, None]  # (B, 1)
            b_ids = torch.where(drop, null_ids, ids[idx]).to(device)
            b_mask = torch.where(drop, null_mask, mask[idx]).to(device)
            loss = training_loss(scheduler, denoise, z, text(b_ids, b_mask), b_mask, gen)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
            opt.step()
            history.append((step, loss.item()))
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1][1]:.4f}")
        unet.eval()
        text.eval()
        train_s += time.time() - started
        cpu_s += time.process_time() - cpu_started
        grid = model.generate(grid_p, grid_s, cfg.sample_steps, cfg.grid_guidance, sampler)
        save_grid(grid, ctx.out_dir / "samples" / f"epoch_{epoch + 1:03d}.png", GRID_SEEDS, 3, grid_rows)
        save_with_generator(checkpoints, epoch + 1, modules, optimizers, gen,
                            {"history": history, "train_s": train_s, "cpu_s": cpu_s})
    bar.close()

    model.save(ctx.out_dir)
    shutil.rmtree(ctx.out_dir / CHECKPOINTS)
    window = max(1, steps_per_epoch // 2)
    smooth = [(s, float(np.mean([v for _, v in history[max(0, i - window + 1): i + 1]])))
              for i, (s, _) in enumerate(history)]
    target = "velocity" if cfg.objective == "flow" else "epsilon"
    save_line_plot({"loss (moving avg)": smooth}, ctx.out_dir / "loss_curve.png",
                   f"t2i {cfg.objective} loss ({target} MSE)", "step")
    shutil.copyfile(ctx.out_dir / "samples" / f"epoch_{cfg.epochs:03d}.png", ctx.out_dir / "samples.png")

    started = time.time()
    quality = score(model, data, cfg, ctx.seed)
    quality["eval_s"] = round(time.time() - started, 1)
    (ctx.out_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    save_quality_plots(quality["steps_curve"], ctx.out_dir, f"{cfg.objective}/{sampler}/{cfg.backbone}")
    metrics = {
        "objective": cfg.objective,
        "backbone": cfg.backbone,
        f"{cfg.backbone}_params": sum(p.numel() for p in unet.parameters()),  # unet_params | dit_params
        "text_params": sum(p.numel() for p in text.parameters()),
        "steps": total,
        "final_loss": round(float(np.mean([v for _, v in history[-steps_per_epoch:]])), 4),
        "train_s": round(train_s, 1),
        "train_cpu_s": round(cpu_s, 1),
        "sampler": sampler,
        "sample_steps": cfg.sample_steps,
        **{k: v for k, v in quality.items() if k not in ("per_prompt", "steps_curve")},
    }
    print_summary(metrics)
    return StageResult(
        outputs={cfg.backbone: cfg.backbone, "text_encoder": "text_encoder", "scheduler": "scheduler",
                 "samples": "samples.png", "epoch_samples": "samples", "loss_curve": "loss_curve.png",
                 "quality": "quality.json", "quality_vs_nfe": "quality_vs_nfe.png", "fid_vs_nfe": "fid_vs_nfe.png"},
        metrics=metrics,
    )


def print_summary(metrics: dict) -> None:
    """Print the stage's key figures as a rich table."""
    print_figures("t2i_train: latent diffusion, judged", metrics)
