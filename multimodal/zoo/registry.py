"""The recipes of the model zoo (light: no torch import).

Each `ZooRecipe` becomes a registered stage `zoo_<name>` (inputs: `t2i_data`), a chain
`zoo_<name>` = ("t2i_data", "zoo_<name>"), a line of `aigc zoo list`, and its overrides in
the `smoke` preset (multimodal/stages.py generates them). A family adds its recipes to its
own tuple below.

    run:    "module:function"  (StageContext) -> StageResult
    sample: "module:function"  (stage_dir: Path, n: int, seed: int, **options) -> (n, 3, S, S) tensor in [-1, 1]
    code:   repo-relative files in the stage's fingerprint (besides the data stage's, common.py,
            the judge and the checkpoint helpers, which every recipe gets)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from multimodal.zoo.gans_config import (CGANConfig, CycleGANConfig, DCGANConfig, Pix2PixConfig, StyleGANConfig,
                                        WGANGPConfig)
from multimodal.zoo.flows_config import GlowConfig, RealNVPConfig
from multimodal.zoo.likelihood_config import AEConfig, PixelCNNConfig, VAEConfig, VQVAEPixelCNNConfig


@dataclasses.dataclass(frozen=True)
class ZooRecipe:
    """One model of the zoo: its stage's config class, run and sample functions, code, metrics, smoke settings."""

    name: str
    family: str
    config: type
    run: str
    sample: str
    code: tuple[str, ...]
    key_metrics: tuple[str, ...]
    smoke: tuple[str, ...] = ()  # "zoo_<name>.key=value" overrides of the `smoke` preset
    summary: str = ""  # one line for `aigc zoo list` (default: the config's docstring)

    @property
    def stage(self) -> str:
        """Return the name of the recipe's stage."""
        return f"zoo_{self.name}"

    def describe(self) -> str:
        """Return the one-line description of the recipe."""
        return self.summary or (self.config.__doc__ or "").split("(", 1)[-1].rsplit(")", 1)[0]

    def load_sample(self) -> Callable:
        """Return the recipe's sample function (imports its module)."""
        module, _, func = self.sample.partition(":")
        return getattr(importlib.import_module(module), func)


_LIKELIHOOD_CODE = ("multimodal/zoo/likelihood.py", "multimodal/zoo/likelihood_config.py")

LIKELIHOOD: tuple[ZooRecipe, ...] = (
    ZooRecipe("ae", "autoencoders", AEConfig, "multimodal.zoo.likelihood:run_ae",
              "multimodal.zoo.likelihood:sample_ae", _LIKELIHOOD_CODE,
              ("test_psnr_db", "train_s"),
              ("zoo_ae.steps=20", "zoo_ae.channels=8,16", "zoo_ae.latent_dim=8", "zoo_ae.checkpoint_every=10")),
    ZooRecipe("vae", "autoencoders", VAEConfig, "multimodal.zoo.likelihood:run_vae",
              "multimodal.zoo.likelihood:sample_vae", _LIKELIHOOD_CODE,
              ("test_bits_per_dim", "test_psnr_db", "fid_like", "train_s"),
              ("zoo_vae.steps=20", "zoo_vae.channels=8,16", "zoo_vae.latent_dim=8", "zoo_vae.kl_warmup=5",
               "zoo_vae.checkpoint_every=10", "zoo_vae.judge=false")),
    ZooRecipe("vqvae_pixelcnn", "autoregressive", VQVAEPixelCNNConfig, "multimodal.zoo.likelihood:run_vqvae_pixelcnn",
              "multimodal.zoo.likelihood:sample_vqvae_pixelcnn", _LIKELIHOOD_CODE,
              ("test_psnr_db", "codebook_perplexity", "prior_bits_per_dim", "fid_like", "train_s"),
              ("zoo_vqvae_pixelcnn.vq_steps=20", "zoo_vqvae_pixelcnn.prior_steps=20",
               "zoo_vqvae_pixelcnn.channels=8,16", "zoo_vqvae_pixelcnn.codebook_size=16",
               "zoo_vqvae_pixelcnn.prior_channels=8", "zoo_vqvae_pixelcnn.prior_layers=2",
               "zoo_vqvae_pixelcnn.checkpoint_every=10", "zoo_vqvae_pixelcnn.judge=false")),
    ZooRecipe("pixelcnn", "autoregressive", PixelCNNConfig, "multimodal.zoo.likelihood:run_pixelcnn",
              "multimodal.zoo.likelihood:sample_pixelcnn", _LIKELIHOOD_CODE,
              ("test_bits_per_dim", "fid_like", "train_s"),
              ("zoo_pixelcnn.steps=10", "zoo_pixelcnn.channels=8", "zoo_pixelcnn.layers=2",
               "zoo_pixelcnn.mixtures=2", "zoo_pixelcnn.sample_count=4", "zoo_pixelcnn.checkpoint_every=5",
               "zoo_pixelcnn.judge=false")),
)

_GAN_CODE = ("multimodal/zoo/gans.py", "multimodal/zoo/gans_config.py", "multimodal/image_metrics.py")


def _gan(name: str, config: type, metrics: tuple[str, ...], smoke: tuple[str, ...]) -> ZooRecipe:
    return ZooRecipe(name, "gans", config, f"multimodal.zoo.gans:run_{name}", f"multimodal.zoo.gans:sample_{name}",
                     _GAN_CODE, metrics, tuple(f"zoo_{name}.{s}" for s in smoke))


GANS: tuple[ZooRecipe, ...] = (
    _gan("dcgan", DCGANConfig, ("fid_like", "baseline_fid_like", "train_s"),
         ("steps=4", "g_channels=16", "d_channels=8", "checkpoint_every=2")),
    _gan("wgan_gp", WGANGPConfig, ("fid_like", "baseline_fid_like", "train_s"),
         ("steps=3", "critic_iters=2", "g_channels=16", "d_channels=8", "checkpoint_every=2")),
    _gan("cgan", CGANConfig, ("fid_like", "class_accuracy", "train_s"),
         ("steps=4", "g_channels=16", "d_channels=8", "checkpoint_every=2")),
    _gan("stylegan", StyleGANConfig, ("fid_like", "baseline_fid_like", "train_s"),
         ("steps=4", "channels=8", "d_channels=8", "mapping_layers=2", "z_dim=16", "w_dim=16", "r1_every=2",
          "checkpoint_every=2")),
    _gan("pix2pix", Pix2PixConfig, ("test_psnr_db", "test_ssim", "train_s"),
         ("steps=4", "channels=8", "d_channels=8", "checkpoint_every=2")),
    _gan("cyclegan", CycleGANConfig, ("cycle_psnr_db", "translation_psnr_db", "domain_accuracy", "train_s"),
         ("steps=4", "channels=8", "blocks=1", "d_channels=8", "checkpoint_every=2")),
)

_FLOWS_CODE = ("multimodal/zoo/flows.py", "multimodal/zoo/flows_config.py")

FLOWS: tuple[ZooRecipe, ...] = (
    ZooRecipe("realnvp", "flows", RealNVPConfig, "multimodal.zoo.flows:run_realnvp",
              "multimodal.zoo.flows:sample_flow", _FLOWS_CODE,
              ("test_bits_per_dim", "baseline_gaussian_bits_per_dim", "fid_like", "train_s"),
              ("zoo_realnvp.steps=4", "zoo_realnvp.hidden=8", "zoo_realnvp.final_couplings=2",
               "zoo_realnvp.batch_size=16", "zoo_realnvp.checkpoint_every=2", "zoo_realnvp.judge=false")),
    ZooRecipe("glow", "flows", GlowConfig, "multimodal.zoo.flows:run_glow",
              "multimodal.zoo.flows:sample_flow", _FLOWS_CODE,
              ("test_bits_per_dim", "baseline_gaussian_bits_per_dim", "fid_like", "train_s"),
              ("zoo_glow.steps=4", "zoo_glow.hidden=8", "zoo_glow.steps_per_level=2",
               "zoo_glow.batch_size=16", "zoo_glow.checkpoint_every=2", "zoo_glow.temperatures=0.7,1.0")),
)

RECIPES: dict[str, ZooRecipe] = {r.name: r for r in LIKELIHOOD + GANS + FLOWS}
