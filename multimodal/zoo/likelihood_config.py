"""Configs of the autoencoder and autoregressive recipes of the model zoo (light: no torch import).

The dataclass defaults are the `tiny` config: each trains in under five minutes on a
2-core CPU; `device="cuda"` and bigger sizes scale them to a GPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class AEConfig:
    """Settings of the `zoo_ae` stage (deterministic conv autoencoder, MSE)."""

    channels: tuple[int, ...] = (32, 64)  # conv widths; each halves the side (16 -> 8 -> 4)
    latent_dim: int = 32  # bottleneck vector
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    checkpoint_every: int = 250  # steps between checkpoints (a killed stage resumes)
    interpolation_steps: int = 8  # columns of the latent interpolation grid
    judge: bool = True  # score samples with the t2i judge (FID-like; ~10 s to fit the judge)
    device: str = "cpu"


@dataclasses.dataclass
class VAEConfig:
    """Settings of the `zoo_vae` stage (conv VAE, discretised-logistic decoder; beta-VAE with beta != 1)."""

    channels: tuple[int, ...] = (32, 64)
    latent_dim: int = 32
    beta: float = 1.0  # weight of the KL term in training (beta-VAE); the reported ELBO always uses 1
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    kl_warmup: int = 300  # steps of linear KL annealing from 0 to beta
    checkpoint_every: int = 250
    interpolation_steps: int = 8
    judge: bool = True
    device: str = "cpu"


@dataclasses.dataclass
class VQVAEPixelCNNConfig:
    """Settings of the `zoo_vqvae_pixelcnn` stage (VQ-VAE, then a gated PixelCNN prior over its codes)."""

    channels: tuple[int, ...] = (32, 64)  # encoder widths; codes on a (16 / 2**len) grid: 4x4
    code_dim: int = 16
    codebook_size: int = 64
    commitment: float = 0.25  # beta of the commitment loss
    vq_steps: int = 1500
    prior_channels: int = 32
    prior_layers: int = 5
    prior_kernel: int = 3
    prior_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    prior_lr: float = 2e-3
    checkpoint_every: int = 250
    dead_code_restart: bool = True  # codes unused over a window re-seeded from encoder outputs (during the first 2/3)
    judge: bool = True
    device: str = "cpu"


@dataclasses.dataclass
class PixelCNNConfig:
    """Settings of the `zoo_pixelcnn` stage (gated PixelCNN on pixels, discretised logistic mixture)."""

    channels: int = 32
    layers: int = 6
    kernel: int = 3  # each layer widens the view by kernel // 2 rows up and columns left
    mixtures: int = 5  # logistic components per pixel (R -> G -> B linear dependence as in PixelCNN++)
    conditional: bool = False  # class-conditional (a label embedding in every gated layer); judged for accuracy
    steps: int = 600  # ~0.2 s a step on one free core; sampling is 256 forward passes per batch
    batch_size: int = 32
    lr: float = 2e-3
    checkpoint_every: int = 250
    sample_count: int = 64  # generated images in samples.png and scored by the judge
    judge: bool = True
    device: str = "cpu"
