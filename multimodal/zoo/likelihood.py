"""Autoencoders (AE, VAE / beta-VAE, VQ-VAE) and autoregressive models (gated PixelCNN) of the model zoo.

Every recipe trains on the train split of the t2i caption set (16x16 RGB) and reports on
the test split:

- `zoo_ae`: conv encoder -> latent vector -> conv decoder, MSE. Held-out reconstruction PSNR;
  samples decode latents drawn from a Gaussian fitted to the training codes.
- `zoo_vae`: the same shape with a Gaussian posterior and a discretised logistic decoder
  over the 256 levels of each sub-pixel, so the negative ELBO is a discrete NLL bound in
  bits/dim (bits_per_dim_discrete). `beta` weights the KL in training (beta-VAE).
- `zoo_vqvae_pixelcnn`: VQ-VAE (EMA codebook, commitment loss, straight-through gradient,
  dead-code restarts) with a discretised logistic decoder, then a gated PixelCNN prior over
  its code grid. Bits/dim of the codes under the prior, and the total bound
  -log p(x) <= -log p(codes) - log p(x | codes) (q is one-hot: no entropy term).
- `zoo_pixelcnn`: gated PixelCNN (vertical + horizontal stacks, no blind spot) on pixels
  with a discretised logistic mixture per pixel (R -> G -> B linear dependence as in
  PixelCNN++); exact test NLL in bits/dim.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from multimodal.zoo.common import (ZooData, bits_per_dim_discrete, final_loss, finish, judge_images,
                                   judge_sample_count, load_config, load_data, load_state, psnr_db, read_stage,
                                   save_samples, train_loop)
from multimodal.zoo.likelihood_config import AEConfig, PixelCNNConfig, VAEConfig, VQVAEPixelCNNConfig
from pipeline.stage import StageContext, StageResult

HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 levels on the [-1, 1] scale


# ---------------------------------------------------------------- discretised logistics


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Return log P(x) per element of a logistic(mean, e^log_scale) discretised to the 256 levels of [-1, 1].

    The edge levels take the tails (-inf, -1 + 1/255] and [1 - 1/255, inf), so the masses of
    the 256 levels sum to one (PixelCNN++). `x` must lie on the levels (k / 127.5 - 1).
    """
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus_in = inv_s * (centered + HALF_BIN)
    min_in = inv_s * (centered - HALF_BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the lowest level's mass
    log_one_minus_cdf_min = -F.softplus(min_in)  # the highest level's mass
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)  # density at the bin centre, for tiny bins
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid - math.log(127.5))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))


def split_logistic(params: torch.Tensor, min_log_scale: float = -7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean, log_scale) of a decoder output (B, 6, H, W): means then log-scales of the 3 sub-pixels."""
    mean, log_scale = params.chunk(2, dim=1)
    return mean, log_scale.clamp_min(min_log_scale)


def logistic_nll(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Return the NLL (nats) per image (B,) of x under the discretised logistic of `params` (B, 6, H, W)."""
    mean, log_scale = split_logistic(params)
    return -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)


def mixture_log_prob(x: torch.Tensor, params: torch.Tensor, mixtures: int) -> torch.Tensor:
    """Return log P(x) per pixel (B, H, W) of a discretised logistic mixture with R -> G -> B dependence.

    params (B, 10·K, H, W): K logits, then 3·K means, 3·K log-scales, 3·K coefficients
    (G's mean += c0·R, B's mean += c1·R + c2·G), as PixelCNN++.
    """
    b, _, h, w = x.shape
    logits = params[:, :mixtures]  # (B, K, H, W)
    rest = params[:, mixtures:].reshape(b, 3, 3, mixtures, h, w)  # (B, what, channel, K, H, W)
    means, log_scales, coeffs = rest[:, 0], rest[:, 1].clamp_min(-7.0), torch.tanh(rest[:, 2])
    xs = x[:, :, None]  # (B, 3, 1, H, W)
    m_r = means[:, 0]
    m_g = means[:, 1] + coeffs[:, 0] * xs[:, 0]
    m_b = means[:, 2] + coeffs[:, 1] * xs[:, 0] + coeffs[:, 2] * xs[:, 1]
    adjusted = torch.stack([m_r, m_g, m_b], dim=1)  # (B, 3, K, H, W)
    per_channel = discretized_logistic_log_prob(xs.expand_as(adjusted), adjusted, log_scales)
    return torch.logsumexp(per_channel.sum(1) + F.log_softmax(logits, dim=1), dim=1)


def sample_mixture(params: torch.Tensor, mixtures: int, gen: torch.Generator) -> torch.Tensor:
    """Return one sampled pixel per position (B, 3, H, W), on the 256 levels, from mixture params (B, 10·K, H, W)."""
    b, _, h, w = params.shape
    logits = params[:, :mixtures]
    rest = params[:, mixtures:].reshape(b, 3, 3, mixtures, h, w)
    u = torch.rand(logits.shape, generator=gen).clamp(1e-5, 1 - 1e-5)
    pick = torch.argmax(logits - torch.log(-torch.log(u)), dim=1, keepdim=True)  # Gumbel-max (B, 1, H, W)
    chosen = [torch.gather(rest[:, i], 2, pick[:, None].expand(b, 3, 1, h, w))[:, :, 0] for i in range(3)]
    means, log_scales, coeffs = chosen[0], chosen[1].clamp_min(-7.0), torch.tanh(chosen[2])
    u = torch.rand(means.shape, generator=gen).clamp(1e-5, 1 - 1e-5)
    noisy = means + torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))
    r = noisy[:, 0].clamp(-1, 1)
    g = (noisy[:, 1] + coeffs[:, 0] * r).clamp(-1, 1)
    bl = (noisy[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g).clamp(-1, 1)
    return quantise(torch.stack([r, g, bl], dim=1))


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Return images in [-1, 1] rounded to the nearest of the 256 levels."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# ---------------------------------------------------------------- conv encoder / decoder


class Encoder(nn.Module):
    """Conv net (B, 3, S, S) -> (B, out) vector, or a (B, out, S/2^L, S/2^L) map where `spatial`."""

    def __init__(self, image_size: int, channels: tuple[int, ...], out: int, spatial: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.SiLU()]
        prev = channels[0]
        for c in channels:
            layers += [nn.Conv2d(prev, c, 4, stride=2, padding=1), nn.SiLU()]
            prev = c
        self.body = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.head = nn.Conv2d(prev, out, 1) if spatial else nn.Linear(prev * side * side, out)
        self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h if self.spatial else h.flatten(1))


class Decoder(nn.Module):
    """Conv net from a (B, latent) vector, or a (B, latent, s, s) map where `spatial`, to (B, out, S, S)."""

    def __init__(self, image_size: int, channels: tuple[int, ...], latent: int, out: int, spatial: bool = False):
        super().__init__()
        self.side = image_size // 2 ** len(channels)
        self.top = channels[-1]
        self.spatial = spatial
        self.head = (nn.Conv2d(latent, self.top, 1) if spatial
                     else nn.Linear(latent, self.top * self.side * self.side))
        layers: list[nn.Module] = [nn.SiLU()]
        prev = self.top
        for c in list(reversed(channels))[1:] + [channels[0]]:
            layers += [nn.ConvTranspose2d(prev, c, 4, stride=2, padding=1), nn.SiLU()]
            prev = c
        layers.append(nn.Conv2d(prev, out, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z)
        if not self.spatial:
            h = h.view(len(z), self.top, self.side, self.side)
        return self.body(h)


class GaussianLatents(nn.Module):
    """A Gaussian N(mean, L L^T) fitted to codes (buffers only): the AE's sampler."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("chol", torch.eye(dim))

    @torch.no_grad()
    def fit(self, codes: torch.Tensor) -> None:
        cov = torch.cov(codes.T) + 1e-4 * torch.eye(codes.shape[1])
        self.mean.copy_(codes.mean(0))
        self.chol.copy_(torch.linalg.cholesky(cov))

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.mean + torch.randn(n, len(self.mean), generator=gen) @ self.chol.T


def batches(n: int, size: int):
    """Yield slices covering range(n) in order."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def batch_indices(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Return the indices of a training batch: `size` drawn uniformly (with replacement) from range(n)."""
    return torch.randint(0, n, (min(size, n),), generator=gen)


def interpolation_pairs(data: ZooData, pairs: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (a, b): `pairs` test images each, of different classes (deterministic)."""
    labels = data.test_labels
    firsts = [int((labels == c).nonzero()[0]) for c in labels.unique().tolist()]
    picks = firsts[:: max(1, len(firsts) // (2 * pairs))][: 2 * pairs]
    while len(picks) < 2 * pairs:
        picks.append(picks[len(picks) % max(1, len(firsts))])
    idx = torch.tensor(picks)
    return data.test[idx[0::2]], data.test[idx[1::2]]


def save_interpolation(encode, decode, data: ZooData, columns: int, path: Path) -> None:
    """Write a grid: each row the real image a, decode((1-t)·z_a + t·z_b) for `columns` values of t, real b."""
    a, b = interpolation_pairs(data)
    with torch.no_grad():
        za, zb = encode(a), encode(b)
        rows = []
        for i in range(len(a)):
            t = torch.linspace(0, 1, columns)[:, None]
            z = (1 - t) * za[i] + t * zb[i]
            rows.append(torch.cat([a[i: i + 1], decode(z), b[i: i + 1]]))
    save_samples(torch.cat(rows), path, ncols=columns + 2)


# ---------------------------------------------------------------- ae


def run_ae(ctx: StageContext) -> StageResult:
    """Train the deterministic autoencoder; report held-out PSNR; samples from a Gaussian fit of its codes."""
    cfg: AEConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    size = data.image_size
    encoder = Encoder(size, tuple(cfg.channels), cfg.latent_dim).to(cfg.device)
    decoder = Decoder(size, tuple(cfg.channels), cfg.latent_dim, 3).to(cfg.device)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    train = data.train.to(cfg.device)

    def step(i: int) -> dict[str, float]:
        x = train[batch_indices(len(train), cfg.batch_size, gen)]
        loss = F.mse_loss(decoder(encoder(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"mse": loss.item()}

    log = train_loop(ctx, "ae", {"encoder": encoder, "decoder": decoder}, {"adam": opt}, cfg.steps, step, gen,
                     cfg.checkpoint_every)
    with torch.no_grad():
        recon = torch.cat([decoder(encoder(data.test[s].to(cfg.device))).cpu() for s in batches(len(data.test), 256)])
        codes = torch.cat([encoder(train[s]).cpu() for s in batches(len(train), 256)])
    prior = GaussianLatents(cfg.latent_dim)
    prior.fit(codes)
    save_interpolation(lambda x: encoder(x.to(cfg.device)).cpu(), lambda z: decoder(z.to(cfg.device)).cpu(),
                       data, cfg.interpolation_steps, ctx.out_dir / "interpolation.png")
    modules = {"encoder": encoder.cpu(), "decoder": decoder.cpu(), "latents": prior}
    samples = _sample_ae(modules, judge_sample_count(data), torch.Generator().manual_seed(ctx.seed + 1))
    metrics = {
        "test_psnr_db": round(psnr_db(recon, data.test), 3),
        "test_mse": round(float(((recon.clamp(-1, 1) - data.test) / 2).pow(2).mean()), 6),
        "final_train_mse": final_loss(log["history"]),
        **(judge_images(data, samples) if cfg.judge else {}),
        "steps": cfg.steps,
        "train_s": round(log["train_s"], 1),
    }
    _save_reconstructions(data, recon, ctx.out_dir / "reconstructions.png")
    return finish(ctx, modules, metrics, samples[:64],
                  {"interpolation": "interpolation.png", "reconstructions": "reconstructions.png"})


def _save_reconstructions(data: ZooData, recon: torch.Tensor, path: Path, n: int = 8) -> None:
    """Write held-out images (first row) above their reconstructions (second row)."""
    save_samples(torch.cat([data.test[:n], recon[:n]]), path, ncols=n)


def _sample_ae(modules: dict, n: int, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return modules["decoder"](modules["latents"].sample(n, gen)).clamp(-1, 1)


def _load_ae(stage_dir: Path) -> dict:
    cfg = load_config(stage_dir, AEConfig)
    size = read_stage(stage_dir)["image_size"]
    modules = {"encoder": Encoder(size, tuple(cfg.channels), cfg.latent_dim),
               "decoder": Decoder(size, tuple(cfg.channels), cfg.latent_dim, 3),
               "latents": GaussianLatents(cfg.latent_dim)}
    for name, module in modules.items():
        module.load_state_dict(load_state(stage_dir, name))
        module.eval()
    return modules


def sample_ae(stage_dir: Path, n: int, seed: int, **options) -> torch.Tensor:
    """Return n images (n, 3, S, S) in [-1, 1] decoded from the Gaussian fitted to the AE's training codes."""
    return _sample_ae(_load_ae(stage_dir), n, torch.Generator().manual_seed(seed))
