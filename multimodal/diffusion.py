"""Latent diffusion pieces: the noise schedule, the DDPM training loss, and our sampling loop
with classifier-free guidance over diffusers' DDPM/DDIM scheduler steps.

A denoiser here is any callable `denoise(x_t, t, states, mask) -> eps` with
x_t (B, C, h, w), t a scalar timestep tensor, states (B, L, D) and mask (B, L);
the UNet wrapper below is one, a test can pass a constructed one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm", "dpm")
PREDICTIONS = ("epsilon", "sample", "v_prediction")  # what a denoiser can be trained to predict


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Return the learning-rate multiplier of a training step: linear warmup, then cosine down to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_train_scheduler(timesteps: int, beta_schedule: str, prediction: str = "epsilon") -> DDPMScheduler:
    """Return the DDPM noise schedule used in training (the network predicts `prediction`: epsilon, sample or
    v_prediction; no clipping of x0).

    clip_sample=False matters: DDIM built from this config inherits it, and clipping
    x0 to [-1, 1] breaks guided sampling of unit-variance latents.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction, clip_sample=False)


def make_sampler(train_scheduler: DDPMScheduler, sampler: str) -> DDPMScheduler | DDIMScheduler:
    """Return a fresh scheduler of kind `sampler` ('ddim', 'ddpm' or 'dpm': DPM-Solver++ 2M) sharing the
    training schedule. DDIM spaces its steps 'leading' (1 step: t = 0), DPM-Solver 'linspace' (from t = 999)."""
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config, clip_sample=False, set_alpha_to_one=True)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_scheduler.config, clip_sample=False)
    raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")


def build_unet(latent_size: int, latent_channels: int, channels: tuple[int, ...], text_dim: int,
               pooled_text: bool, head_dim: int = 8) -> UNet2DConditionModel:
    """Return an untrained UNet2DConditionModel with text cross-attention at every level but the lowest.

    One resolution level per entry of `channels`; the innermost level is a plain
    ResNet block, the others cross-attend to the text states (dim `text_dim`).
    With `pooled_text`, the masked mean of the text states is also projected and
    added to the timestep embedding (as SDXL adds its pooled text embedding), a
    global path that conditions every ResNet block and learns faster than attention.
    """
    levels = len(channels)
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        cross_attention_dim=text_dim,
        attention_head_dim=head_dim,
        norm_num_groups=min(16, min(channels)),
        class_embed_type="projection" if pooled_text else None,
        projection_class_embeddings_input_dim=text_dim if pooled_text else None,
    )


def pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean of text states (B, L, D) over real tokens (mask (B, L)) as (B, D)."""
    m = mask.to(states.dtype)[..., None]
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


def unet_denoiser(unet: UNet2DConditionModel) -> Denoiser:
    """Return `denoise(x_t, t, states, mask) -> eps` calling the UNet with text cross-attention
    (and the pooled text in the timestep embedding where the UNet was built with it)."""
    uses_pooled = unet.config.class_embed_type == "projection"

    def denoise(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask.float(),
                    class_labels=pooled(states, mask) if uses_pooled else None).sample

    return denoise


def diffusion_loss(denoise: Denoiser, scheduler: DDPMScheduler, latents: torch.Tensor, states: torch.Tensor,
                   mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return the DDPM MSE on latents (B, C, h, w) at uniformly drawn timesteps, against the target of the
    scheduler's prediction type: the noise (epsilon), the clean latents (sample) or the velocity (v_prediction)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)  # sqrt(a_t) x0 + sqrt(1 - a_t) eps
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "sample":
        target = latents
    else:
        target = scheduler.get_velocity(latents, noise, t)
    return (denoise(noisy, t, states, mask) - target).pow(2).mean()


def guided_eps(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
               uncond: tuple[torch.Tensor, torch.Tensor], guidance: float) -> torch.Tensor:
    """Return eps_u + guidance · (eps_c − eps_u); at guidance 1 only the conditional pass runs."""
    if guidance == 1.0:
        return denoise(x, t, *cond)
    states = torch.cat([uncond[0], cond[0]])  # (2B, L, D)
    mask = torch.cat([uncond[1], cond[1]])
    eps_u, eps_c = denoise(torch.cat([x, x]), t, states, mask).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample(
    denoise: Denoiser,
    scheduler: DDPMScheduler | DDIMScheduler,
    noise: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    guidance: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return x_0 (B, C, h, w) sampled from x_T = `noise` in `steps` scheduler steps with CFG.

    cond/uncond are (states (B, L, D), mask (B, L)) of the prompts and of the empty
    prompt. DDIM is deterministic (eta = 0); DDPM draws its step noise from `generator`.
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = guided_eps(denoise, x, t, cond, uncond, guidance)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
