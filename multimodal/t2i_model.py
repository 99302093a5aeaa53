"""The trained text-to-image model as one object: VAE + text encoder + backbone + noise schedule.

Written by the `t2i_train` stage (backbone and scheduler in diffusers format, the text
encoder as safetensors + JSON) next to the `t2i_vae` stage's VAE; `generate`
turns prompts and seeds into images, used by the stage, the judge and `aigc t2i sample`.
The backbone is a UNet2DConditionModel in `unet/` or our DiT in `dit/`; the scheduler's
class names the objective (DDPMScheduler: ddpm; see multimodal/objectives.py), so the
first format (DDPM + UNet) loads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from multimodal.diffusion import Denoiser, unet_denoiser
from multimodal.dit import DiT
from multimodal.objectives import SCHEDULERS, sample_latents
from multimodal.text_encoder import TextEncoder, WordTokenizer, load_text_encoder, save_text_encoder

UNET_DIR = "unet"
DIT_DIR = "dit"
TEXT_DIR = "text_encoder"
SCHEDULER_DIR = "scheduler"


@dataclasses.dataclass
class T2IModel:
    """The parts needed to turn a prompt into an image."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel | DiT  # the backbone (the name kept from when it was always a UNet)
    text_encoder: TextEncoder
    tokenizer: WordTokenizer
    scheduler: DDPMScheduler  # or another objective's scheduler (multimodal.objectives.SCHEDULERS)

    @classmethod
    def load(cls, vae_dir: Path, train_dir: Path, device: str = "cpu") -> "T2IModel":
        """Return the model from the `t2i_vae` output dir `vae_dir` and the `t2i_train` output dir."""
        vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
        if (train_dir / DIT_DIR).is_dir():
            unet = DiT.from_pretrained(train_dir / DIT_DIR).to(device).eval()
        else:
            unet = UNet2DConditionModel.from_pretrained(train_dir / UNET_DIR).to(device).eval()
        text_encoder, tokenizer = load_text_encoder(train_dir / TEXT_DIR)
        return cls(vae, unet, text_encoder.to(device), tokenizer, load_scheduler(train_dir / SCHEDULER_DIR))

    def save(self, train_dir: Path) -> None:
        """Write the backbone (unet/ or dit/), text encoder + tokenizer and scheduler config under `train_dir`."""
        self.unet.save_pretrained(train_dir / (DIT_DIR if isinstance(self.unet, DiT) else UNET_DIR),
                                  safe_serialization=True)
        save_text_encoder(self.text_encoder, self.tokenizer, train_dir / TEXT_DIR)
        self.scheduler.save_pretrained(train_dir / SCHEDULER_DIR)

    @property
    def device(self) -> torch.device:
        """Return the device the UNet lives on."""
        return next(self.unet.parameters()).device

    @property
    def backbone(self) -> str:
        """Return 'dit' or 'unet'."""
        return "dit" if isinstance(self.unet, DiT) else "unet"

    def denoiser(self) -> Denoiser:
        """Return `denoise(x_t, t, states, mask)` calling the backbone."""
        return self.unet if isinstance(self.unet, DiT) else unet_denoiser(self.unet)

    def latent_shape(self) -> tuple[int, int, int]:
        """Return (C, h, w) of the latents the backbone denoises."""
        c = self.unet.config.in_channels
        return c, self.unet.config.sample_size, self.unet.config.sample_size

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return text states (B, L, D) and mask (B, L) of `prompts`."""
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.text_encoder(ids, mask), mask

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Return images (B, 3, S, S) in [0, 1] from scaled latents (B, C, h, w)."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (images.clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                 sampler: str | None = None, batch_size: int = 256) -> np.ndarray:
        """Return images (B, S, S, 3) float in [0, 1], one per (prompt, seed) pair.

        `sampler` is one of the objective's (multimodal.objectives.SAMPLERS); None
        is its default (ddim for ddpm). The starting noise of each image depends on
        its seed only, so a seed gives the same image whatever else is in the batch
        with the deterministic samplers (ddim, dpm, ode, euler, heun); the stochastic
        ones (ddpm, em, pc) also draw step noise from the first seed of the batch.
        """
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk_p, chunk_s = prompts[start: start + batch_size], seeds[start: start + batch_size]
            noise = torch.stack([torch.randn(self.latent_shape(), generator=torch.Generator().manual_seed(s))
                                 for s in chunk_s]).to(self.device)  # (B, C, h, w)
            cond = self.encode_prompts(chunk_p)
            uncond = self.encode_prompts([""] * len(chunk_p))
            step_gen = torch.Generator().manual_seed(chunk_s[0])
            latents = sample_latents(self.scheduler, sampler, self.denoiser(), noise, cond, uncond, steps,
                                     guidance, step_gen)
            out.append(self.decode(latents).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)


def load_scheduler(path: Path):
    """Return the scheduler saved at `path`, of the class its config names (one of the objectives')."""
    name = json.loads((path / "scheduler_config.json").read_text())["_class_name"]
    classes = {cls.__name__: cls for cls in SCHEDULERS.values()}
    if name not in classes:
        raise ValueError(f"{path}: scheduler {name!r} is none of the t2i objectives' ({', '.join(classes)})")
    return classes[name].from_pretrained(path)
