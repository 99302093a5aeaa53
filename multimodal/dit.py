"""A small diffusion transformer (DiT) for latents, conditioned on time and text by adaLN-Zero.

The latent (B, C, h, w) is cut into p×p patches, one token each (B, N, D) with
N = (h/p)·(w/p), plus a learned position embedding. The conditioning vector
c (B, D) is the sinusoidal timestep embedding (diffusers' `Timesteps` +
`TimestepEmbedding`) plus a projection of the pooled text states. Every block
regresses from c a shift, a scale and a gate for each of its three residual
branches (self-attention over patches, cross-attention to the text states,
MLP): x ← x + gate · branch(LayerNorm(x) · (1 + scale) + shift). The
regressions start at zero ("Zero"), so each block starts as the identity and
the final projection starts at zero: the untrained model predicts 0 everywhere.
A diffusers `ModelMixin`, so `save_pretrained`/`from_pretrained` write and read
`config.json` + safetensors, as for the UNet.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return x (B, N, D) · (1 + scale) + shift, with shift and scale (B, D) broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention over patches, cross-attention to text, MLP; each branch modulated and gated from c."""

    def __init__(self, width: int, heads: int, text_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross = nn.MultiheadAttention(width, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))  # 3 × (shift, scale, gate)
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return x (B, N, D) after the block, given c (B, D), text states (B, L, E) and mask (B, L) (True = token)."""
        s1, b1, g1, s2, b2, g2, s3, b3, g3 = self.ada(c).chunk(9, dim=-1)  # (B, D) each
        h = modulate(self.norm1(x), s1, b1)
        x = x + g1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        h = modulate(self.norm2(x), s2, b2)
        x = x + g2[:, None] * self.cross(h, text, text, key_padding_mask=~mask, need_weights=False)[0]
        return x + g3[:, None] * self.mlp(modulate(self.norm3(x), s3, b3))


class DiT(ModelMixin, ConfigMixin):
    """Patchified latent transformer: `forward(x, t, states, mask) -> (B, C, h, w)` (eps or velocity)."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 4, patch_size: int = 2, width: int = 128,
                 depth: int = 4, heads: int = 4, text_dim: int = 32, mlp_ratio: int = 4):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"latent side {sample_size} is not a multiple of the patch size {patch_size}")
        tokens = (sample_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)  # (B, D, h/p, w/p)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.text_embed = nn.Linear(text_dim, width)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, text_dim, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.proj_out = nn.Linear(width, patch_size * patch_size * in_channels)
        for layer in (self.ada_out[1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return c (B, D): timestep embedding + projected masked mean of the text states."""
        b = states.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        m = mask.to(states.dtype)[..., None]  # (B, L, 1)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, E)
        return self.time_embed(self.time_proj(t).to(states.dtype)) + self.text_embed(pooled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the prediction (B, C, h, w) for latents x (B, C, h, w) at timesteps t (scalar or (B,))."""
        b, ch, h, w = x.shape
        p = self.config.patch_size
        c = self.condition(t, states, mask)  # (B, D)
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        for block in self.blocks:
            tokens = block(tokens, c, states, mask)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p·p·C)
        out = out.reshape(b, h // p, w // p, p, p, ch)  # unpatchify
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, ch, h, w)
