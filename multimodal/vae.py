"""The `t2i_vae` stage: a small diffusers `AutoencoderKL` trained first, giving the latent space.

Loss: mean squared reconstruction error plus `kl_weight` × KL(q(z|x) ‖ N(0, I)).
After training, `scaling_factor` (1 / std of the training latents) is written into
the VAE's config, as Stable Diffusion does, so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from multimodal.figures import print_figures
from multimodal.pictures import save_grid, save_line_plot
from multimodal.t2i_data import read_caption_set
from pipeline.stage import StageContext, StageResult

VAE_DIR = "vae"


def build_vae(image_size: int, channels: tuple[int, ...], latent_channels: int) -> AutoencoderKL:
    """Return an untrained AutoencoderKL: one resolution level per entry of `channels` (×2 down between)."""
    groups = min(8, min(channels))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=image_size,
    )


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """Return uint8 images (N, 3, S, S) as float32 in [-1, 1]."""
    return torch.from_numpy(images_uint8).float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Return the mean squared error in [0, 1] pixel units of decode(mean of q(z|x)) on images in [-1, 1]."""
    vae.eval()
    device = next(vae.parameters()).device
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += float(((rec.clamp(-1, 1) - x) / 2).pow(2).sum())
    return total / images.numel()


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Return the standard deviation of the posterior means of `images` (in [-1, 1])."""
    vae.eval()
    device = next(vae.parameters()).device
    means = [vae.encode(images[s: s + batch_size].to(device)).latent_dist.mean.cpu()
             for s in range(0, len(images), batch_size)]
    return float(torch.cat(means).std())


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Train `vae` on images (N, 3, S, S) in [-1, 1]; return the (step, loss) history."""
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    history = []
    vae.train()
    for step in tqdm(range(steps), desc="vae", disable=not progress):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx].to(device)  # (B, 3, S, S)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append((step, loss.item()))
    vae.eval()
    return history


def run(ctx: StageContext) -> StageResult:
    """Train the VAE on the train split, write it (diffusers format) and pictures; return recon figures."""
    cfg = ctx.config
    torch.manual_seed(ctx.seed)
    data = read_caption_set(ctx.input_path("t2i_data", "dataset").parent)
    images = to_model_range(data["images"])
    train, test = images[data["split"] == 0], images[data["split"] == 1]
    image_size = images.shape[-1]
    vae = build_vae(image_size, tuple(cfg.channels), cfg.latent_channels).to(cfg.device)
    mse_before = reconstruction_mse(vae, test)
    started, cpu_started = time.time(), time.process_time()
    history = train_vae(vae, train, cfg.steps, cfg.batch_size, cfg.lr, cfg.kl_weight, ctx.seed)
    train_s, cpu_s = time.time() - started, time.process_time() - cpu_started
    vae = vae.cpu()
    mse_after = reconstruction_mse(vae, test)
    scale = 1.0 / latent_std(vae, train)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(ctx.out_dir / VAE_DIR, safe_serialization=True)

    with torch.no_grad():
        shown = test[:16]
        rec = vae.decode(vae.encode(shown).latent_dist.mean).sample.clamp(-1, 1)
    pair = torch.cat([shown, rec]).permute(0, 2, 3, 1).numpy() * 0.5 + 0.5
    save_grid(pair, ctx.out_dir / "reconstructions.png", ncols=16, scale=3)
    save_line_plot({"train loss": history}, ctx.out_dir / "loss_curve.png", "VAE training loss", "step")

    latent = vae.encode(shown[:1]).latent_dist.mean.shape[1:]
    metrics = {
        "params": sum(p.numel() for p in vae.parameters()),
        "steps": cfg.steps,
        "recon_mse_before": round(mse_before, 5),
        "recon_mse_after": round(mse_after, 5),
        "recon_psnr_db": round(float(10 * np.log10(1.0 / max(mse_after, 1e-12))), 2),
        "latent_shape": list(latent),
        "scaling_factor": round(scale, 4),
        "train_s": round(train_s, 1),
        "train_cpu_s": round(cpu_s, 1),
    }
    print_figures("t2i_vae: AutoencoderKL", metrics)
    return StageResult(
        outputs={"vae": VAE_DIR, "reconstructions": "reconstructions.png", "loss_curve": "loss_curve.png"},
        metrics=metrics,
    )
