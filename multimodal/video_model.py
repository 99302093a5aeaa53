"""A factorised space–time denoiser for short clips: 2-D layers per frame, temporal layers across frames.

Shapes: a clip batch is x (B, T, C, H, W). Spatial layers (ResBlocks, spatial self- and
text cross-attention) see frames (B·T, C, H, W) and never mix them; temporal layers see, at
each pixel, the sequence over frames (B·H·W, T, C): attention with a learned frame-position
embedding (as VDM / AnimateDiff's temporal transformers), or a 1-D convolution over time
((2+1)-D, as R(2+1)D), or none (every frame denoised alone: the ablation). A small UNet: full
resolution, then half resolution with text cross-attention, and back with a skip.
Conditioning: the timestep's sinusoidal embedding plus the pooled text (FiLM in every
ResBlock), and cross-attention of the half-resolution pixels to the text states. Its call
`model(x_t, t, states, mask) -> eps` is multimodal.diffusion's denoiser.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from torch import nn

from multimodal.diffusion import make_sampler, pooled, sample
from multimodal.text_encoder import TextEncoder, WordTokenizer, load_text_encoder, save_text_encoder

TEMPORAL = ("attention", "conv", "none")
WEIGHTS_FILE = "denoiser.safetensors"
CONFIG_FILE = "denoiser.json"
DENOISER_DIR, TEXT_DIR, SCHEDULER_DIR = "denoiser", "text_encoder", "scheduler"


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Return sinusoidal embeddings (B, dim) of timesteps t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def groups(channels: int) -> int:
    """Return the GroupNorm group count of a width (8, or fewer for narrow layers)."""
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """Per-frame residual block: GroupNorm, SiLU, 3×3 conv, FiLM by the embedding, again; frames never mix."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Return (N, c_out, H, W) for frames x (N, c_in, H, W) and their embeddings emb (N, E)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SpatialAttention(nn.Module):
    """Per-frame self-attention over pixels, then cross-attention of the pixels to the text states."""

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return frames (N, C, H, W) after attention; states (N, L, D) and mask (N, L) are each frame's text."""
        n, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)  # (N, H·W, C)
        q = self.norm1(seq)
        seq = seq + self.self_attn(q, q, q, need_weights=False)[0]
        seq = seq + self.cross_attn(self.norm2(seq), states, states, key_padding_mask=~mask, need_weights=False)[0]
        return seq.transpose(1, 2).reshape(n, c, h, w)


class TemporalAttention(nn.Module):
    """At every pixel, pre-norm self-attention over the frames with a learned frame-position embedding."""

    def __init__(self, channels: int, heads: int, max_frames: int):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(max_frames, channels) * 0.02)
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Return (B·T, C, H, W): x (B·T, C, H, W) with each pixel's features mixed across its clip's T frames."""
        bt, c, h, w = x.shape
        seq = x.reshape(bt // frames, frames, c, h * w).permute(0, 3, 1, 2).reshape(-1, frames, c)  # (B·H·W, T, C)
        q = self.norm(seq + self.positions[:frames])
        seq = seq + self.attn(q, q, q, need_weights=False)[0]
        return seq.reshape(bt // frames, h * w, frames, c).permute(0, 2, 3, 1).reshape(bt, c, h, w)


class TemporalConv(nn.Module):
    """At every pixel, a 1-D convolution (kernel 3, zero-padded) over the frames: the '+1' of (2+1)-D."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups(channels), channels)
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Return (B·T, C, H, W): x plus a temporal convolution of its normalised features."""
        bt, c, h, w = x.shape
        seq = F.silu(self.norm(x)).reshape(bt // frames, frames, c, h * w).permute(0, 3, 2, 1)  # (B, H·W, C, T)
        out = self.conv(seq.reshape(-1, c, frames))  # (B·H·W, C, T)
        return x + out.reshape(bt // frames, h * w, c, frames).permute(0, 3, 2, 1).reshape(bt, c, h, w)


class NoTemporal(nn.Module):
    """The ablation: no mixing across frames."""

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Return x unchanged."""
        return x


def temporal_layer(kind: str, channels: int, heads: int, max_frames: int) -> nn.Module:
    """Return the temporal layer `kind` ('attention', 'conv' or 'none') of a width."""
    if kind == "attention":
        return TemporalAttention(channels, heads, max_frames)
    if kind == "conv":
        return TemporalConv(channels)
    if kind == "none":
        return NoTemporal()
    raise ValueError(f"unknown temporal layer {kind!r}; choose from {', '.join(TEMPORAL)}")


class VideoDenoiser(nn.Module):
    """The space–time UNet: eps (B, T, C, H, W) from noisy clips, timesteps and text states."""

    def __init__(self, channels: tuple[int, ...] = (32, 64), temporal: str = "attention", heads: int = 4,
                 text_dim: int = 32, frames: int = 8, in_channels: int = 3, frame_size: int = 16):
        super().__init__()
        c0, c1 = channels
        self.config = {"channels": [c0, c1], "temporal": temporal, "heads": heads, "text_dim": text_dim,
                       "frames": frames, "in_channels": in_channels, "frame_size": frame_size}
        emb = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(text_dim, emb)
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down_res = ResBlock(c0, c0, emb)
        self.down_time = temporal_layer(temporal, c0, heads, frames)
        self.down = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.mid_res = ResBlock(c1, c1, emb)
        self.mid_space = SpatialAttention(c1, text_dim, heads)
        self.mid_time = temporal_layer(temporal, c1, heads, frames)
        self.mid_res2 = ResBlock(c1, c1, emb)
        self.mid_time2 = temporal_layer(temporal, c1, heads, frames)
        self.up = nn.Conv2d(c1, c0, 3, padding=1)
        self.up_res = ResBlock(2 * c0, c0, emb)
        self.up_time = temporal_layer(temporal, c0, heads, frames)
        self.norm_out = nn.GroupNorm(groups(c0), c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return predicted noise (B, T, C, H, W) for noisy clips x, timesteps t (B,) or scalar, text states
        (B, L, D) and mask (B, L) True = token."""
        b, frames, c, h, w = x.shape
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        emb = self.time_mlp(timestep_embedding(t.to(x.device), self.config["channels"][0]))
        emb = (emb + self.text_proj(pooled(states, mask))).repeat_interleave(frames, 0)  # (B·T, E)
        frame_states = states.repeat_interleave(frames, 0)  # (B·T, L, D)
        frame_mask = mask.repeat_interleave(frames, 0)
        h0 = self.conv_in(x.reshape(b * frames, c, h, w))  # (B·T, c0, H, W)
        h0 = self.down_time(self.down_res(h0, emb), frames)
        h1 = self.mid_res(self.down(h0), emb)  # (B·T, c1, H/2, W/2)
        h1 = self.mid_time(self.mid_space(h1, frame_states, frame_mask), frames)
        h1 = self.mid_time2(self.mid_res2(h1, emb), frames)
        u = self.up(F.interpolate(h1, size=(h, w), mode="nearest"))  # (B·T, c0, H, W)
        u = self.up_time(self.up_res(torch.cat([u, h0], dim=1), emb), frames)
        return self.conv_out(F.silu(self.norm_out(u))).reshape(b, frames, c, h, w)

    def save(self, directory: Path) -> None:
        """Write denoiser.safetensors and denoiser.json (its config) to `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "VideoDenoiser":
        """Return the (eval-mode) denoiser written by `save`."""
        config = json.loads((directory / CONFIG_FILE).read_text())
        model = cls(**{**config, "channels": tuple(config["channels"])})
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return model.eval()


@dataclasses.dataclass
class VideoModel:
    """The parts that turn a caption into a clip: text encoder + tokenizer, denoiser, training noise schedule."""

    denoiser: VideoDenoiser
    text_encoder: TextEncoder
    tokenizer: WordTokenizer
    scheduler: DDPMScheduler

    @classmethod
    def load(cls, train_dir: Path, device: str = "cpu") -> "VideoModel":
        """Return the model a `video_train` stage wrote under `train_dir`."""
        text, tokenizer = load_text_encoder(train_dir / TEXT_DIR)
        return cls(VideoDenoiser.load(train_dir / DENOISER_DIR).to(device), text.to(device), tokenizer,
                   DDPMScheduler.from_pretrained(train_dir / SCHEDULER_DIR))

    def save(self, train_dir: Path) -> None:
        """Write denoiser/, text_encoder/ and scheduler/ under `train_dir`."""
        self.denoiser.save(train_dir / DENOISER_DIR)
        save_text_encoder(self.text_encoder, self.tokenizer, train_dir / TEXT_DIR)
        self.scheduler.save_pretrained(train_dir / SCHEDULER_DIR)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return text states (B, L, D) and mask (B, L) of `prompts`."""
        device = next(self.denoiser.parameters()).device
        ids, mask = self.tokenizer(prompts)
        return self.text_encoder(ids.to(device), mask.to(device)), mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                 batch_size: int = 64) -> np.ndarray:
        """Return clips (B, T, H, W, 3) in [0, 1], one per (prompt, seed), sampled by DDIM (deterministic: a
        clip depends on its prompt and seed only) with classifier-free guidance `guidance`."""
        cfg = self.denoiser.config
        size = self.frame_size
        shape = (cfg["frames"], cfg["in_channels"], size, size)
        device = next(self.denoiser.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk_p, chunk_s = prompts[start: start + batch_size], seeds[start: start + batch_size]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in chunk_s])
            x = sample(self.denoiser, make_sampler(self.scheduler, "ddim"), noise.to(device), self.encode(chunk_p),
                       self.encode([""] * len(chunk_p)), steps, guidance)
            out.append(((x.clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2).cpu().numpy())
        return np.concatenate(out)

    @property
    def frame_size(self) -> int:
        """Return the frame side in pixels the denoiser was trained on."""
        return int(self.denoiser.config["frame_size"])
