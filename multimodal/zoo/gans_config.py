"""Configs of the GAN recipes of the model zoo (light: no torch import).

The dataclass defaults are the `tiny` config: each trains in under five minutes on a
2-core CPU; `device="cuda"` and more steps or wider nets scale them to a GPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DCGANConfig:
    """Settings of the `zoo_dcgan` stage (DCGAN: transposed-conv generator with BatchNorm, conv discriminator, BCE)."""

    z_dim: int = 64
    g_channels: int = 64  # generator width at 4x4 (halved at every upsampling)
    d_channels: int = 32  # discriminator width at 16x16 (doubled at every downsampling)
    steps: int = 800  # generator steps (one discriminator step each)
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    minibatch_std: bool = False  # the discriminator sees each group of 4 samples' feature spread (ProGAN)
    checkpoint_every: int = 200
    device: str = "cpu"


@dataclasses.dataclass
class WGANGPConfig:
    """Settings of the `zoo_wgan_gp` stage (WGAN-GP: critic iterations, gradient penalty)."""

    z_dim: int = 64
    g_channels: int = 32
    d_channels: int = 16
    steps: int = 500  # generator steps
    critic_iters: int = 5  # critic steps per generator step
    gp_weight: float = 10.0  # lambda of (||grad D(x_hat)|| - 1)^2 on random interpolates
    batch_size: int = 32
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    checkpoint_every: int = 100
    device: str = "cpu"


@dataclasses.dataclass
class CGANConfig:
    """Settings of the `zoo_cgan` stage (class-conditional GAN: conditional BatchNorm generator, projection discriminator, hinge loss)."""

    z_dim: int = 64
    g_channels: int = 32
    d_channels: int = 16
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-4
    betas: tuple[float, float] = (0.0, 0.9)
    checkpoint_every: int = 500
    device: str = "cpu"


@dataclasses.dataclass
class StyleGANConfig:
    """Settings of the `zoo_stylegan` stage (small StyleGAN2: mapping net, modulated convs, noise inputs, style mixing)."""

    z_dim: int = 64
    w_dim: int = 64
    mapping_layers: int = 4
    channels: int = 32  # synthesis width (4x4 -> 8x8 -> 16x16)
    d_channels: int = 32
    style_mixing: float = 0.9  # probability of a two-latent crossover in a training batch
    minibatch_std: bool = True
    r1_gamma: float = 1.0  # R1 penalty weight on real images
    r1_every: int = 4  # lazy R1 regularisation
    steps: int = 900
    batch_size: int = 32
    lr: float = 2e-3
    mapping_lr_mult: float = 0.01
    betas: tuple[float, float] = (0.0, 0.99)
    ema: float = 0.995  # exponential moving average of the generator (used for sampling)
    truncation: float = 1.0  # psi of the truncation trick in sampling (1 = off)
    checkpoint_every: int = 150
    device: str = "cpu"


@dataclasses.dataclass
class Pix2PixConfig:
    """Settings of the `zoo_pix2pix` stage (U-Net generator + PatchGAN discriminator, L1 + adversarial, outlines -> images)."""

    channels: int = 32  # U-Net width at 16x16 (doubled per level)
    levels: int = 3  # down/up-sampling levels of the U-Net (16 -> 2)
    d_channels: int = 32
    l1_weight: float = 100.0
    steps: int = 1400
    batch_size: int = 32
    lr: float = 2e-4
    beta1: float = 0.5
    checkpoint_every: int = 250
    device: str = "cpu"


@dataclasses.dataclass
class CycleGANConfig:
    """Settings of the `zoo_cyclegan` stage (unpaired translation: white-on-black digits <-> amber-on-blue digits)."""

    channels: int = 32  # generator width
    blocks: int = 2  # residual blocks of each generator
    d_channels: int = 32
    cycle_weight: float = 10.0
    identity_weight: float = 5.0  # x 0.5 of cycle, as CycleGAN
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-4
    beta1: float = 0.5
    checkpoint_every: int = 100
    device: str = "cpu"
