"""Configs of the normalizing-flow recipes of the model zoo (light: no torch import).

The dataclass defaults are the `tiny` config: each trains in under five minutes
on a 2-core CPU; `device="cuda"` and bigger sizes scale them to a GPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RealNVPConfig:
    """Settings of the `zoo_realnvp` stage (RealNVP: affine couplings with checkerboard and channel masks, multi-scale)."""

    hidden: int = 32  # channels of each coupling's conv net
    blocks: int = 0  # residual blocks (2 × conv3×3) per coupling net, after conv3×3 → conv1×1
    scales: int = 2  # multi-scale levels (each but the last: 3 checkerboard, squeeze, 3 channel couplings, factor out half)
    final_couplings: int = 4  # checkerboard couplings of the last level
    preprocess: str = "logit"  # logit | affine: the map of the dequantised unit cube to the flow's input
    logit_alpha: float = 0.05  # logit(α + (1 − 2α) y): keeps the logit finite at 0 and 1
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-5  # L2 on the coupling nets (as the paper)
    grad_clip: float = 50.0
    checkpoint_every: int = 100  # steps between checkpoints (a killed stage resumes)
    temperatures: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0)  # one grid row each; FID-like judged at each
    judge: bool = True  # FID-like distance of judge_sample_count() samples per temperature
    device: str = "cpu"


@dataclasses.dataclass
class GlowConfig:
    """Settings of the `zoo_glow` stage (Glow: actnorm, invertible 1×1 conv, affine coupling, multi-scale)."""

    hidden: int = 48  # channels of each coupling's conv net
    levels: int = 2  # squeeze → K steps → split (all but the last level)
    steps_per_level: int = 4  # K flow steps (actnorm, 1×1 conv, coupling) per level
    lu_decomposed: bool = True  # LU-parametrised 1×1 conv (O(C) log-det); False: plain weight + slogdet
    learned_prior: bool = True  # factored-out halves get N(μ, σ) from a zero-initialised conv of the kept half
    preprocess: str = "affine"  # affine (y − ½) | logit
    logit_alpha: float = 0.05
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 50.0
    checkpoint_every: int = 100
    temperatures: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0)
    judge: bool = True
    device: str = "cpu"
