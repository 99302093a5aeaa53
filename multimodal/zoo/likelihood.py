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


def marginal_bits_per_dim(train_uint8: torch.Tensor, test_uint8: torch.Tensor) -> float:
    """Return the test bits/dim of the trivial baseline: an independent 256-level histogram per sub-pixel position,
    counted on the train split (add-one smoothed)."""
    flat_train, flat_test = train_uint8.flatten(1).long(), test_uint8.flatten(1).long()
    counts = torch.ones(flat_train.shape[1], 256)
    counts.scatter_add_(1, flat_train.T, torch.ones(flat_train.T.shape))
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    nll = -log_p.gather(1, flat_test.T).sum()
    return bits_per_dim_discrete(float(nll), flat_test.numel())


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
    firsts = [int((labels == c).nonzero()[0]) for c in labels.unique().tolist()]  # one image per class
    spread = torch.linspace(0, len(firsts) - 1, 2 * pairs).round().long()  # classes across digits and shapes
    idx = torch.tensor([firsts[int(i)] for i in spread])
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


# ---------------------------------------------------------------- vae


class VAE(nn.Module):
    """Gaussian posterior q(z|x) = N(mu, sigma^2), prior N(0, I), discretised logistic p(x|z) per sub-pixel."""

    def __init__(self, image_size: int, channels: tuple[int, ...], latent_dim: int):
        super().__init__()
        self.encoder = Encoder(image_size, channels, 2 * latent_dim)
        self.decoder = Decoder(image_size, channels, latent_dim, 6)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        return mu, log_var.clamp(-12, 8)

    def losses(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (reconstruction NLL, KL) per image (B,) each, in nats, with one posterior sample."""
        mu, log_var = self.posterior(x)
        z = mu + torch.exp(0.5 * log_var) * torch.randn(mu.shape, generator=gen).to(mu.device)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        return logistic_nll(x, self.decoder(z)), kl

    def mean_image(self, z: torch.Tensor) -> torch.Tensor:
        return split_logistic(self.decoder(z))[0].clamp(-1, 1)


@torch.no_grad()
def vae_test_figures(vae: VAE, images: torch.Tensor, seed: int, passes: int = 4) -> dict:
    """Return the negative ELBO (bits/dim, discrete), its reconstruction and KL parts, and PSNR of decode(mu)."""
    gen = torch.Generator().manual_seed(seed)
    rec, kl, recon = 0.0, 0.0, []
    for s in batches(len(images), 256):
        x = images[s]
        for _ in range(passes):
            r, k = vae.losses(x, gen)
            rec += float(r.sum()) / passes
            kl += float(k.sum()) / passes
        recon.append(vae.mean_image(vae.posterior(x)[0]))
    dims = images[0].numel() * len(images)
    return {"test_bits_per_dim": round(bits_per_dim_discrete(rec + kl, dims), 4),
            "test_recon_bits_per_dim": round(bits_per_dim_discrete(rec, dims), 4),
            "test_kl_bits_per_dim": round(bits_per_dim_discrete(kl, dims), 4),
            "test_psnr_db": round(psnr_db(torch.cat(recon), images), 3)}


def run_vae(ctx: StageContext) -> StageResult:
    """Train the (beta-)VAE on the negative ELBO; report test bits/dim (discrete), PSNR, prior samples."""
    cfg: VAEConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    vae = VAE(data.image_size, tuple(cfg.channels), cfg.latent_dim)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    train, dims = data.train, data.dims

    def step(i: int) -> dict[str, float]:
        x = train[batch_indices(len(train), cfg.batch_size, gen)]
        rec, kl = vae.losses(x, gen)
        weight = cfg.beta * min(1.0, (i + 1) / max(1, cfg.kl_warmup))
        loss = (rec + weight * kl).mean() / dims
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 100.0)
        opt.step()
        return {"loss": loss.item(), "bits_per_dim": bits_per_dim_discrete((rec + kl).mean().item(), dims)}

    log = train_loop(ctx, "vae", {"vae": vae}, {"adam": opt}, cfg.steps, step, gen, cfg.checkpoint_every)
    figures = vae_test_figures(vae, data.test, ctx.seed + 2)
    samples = _sample_vae(vae, judge_sample_count(data), torch.Generator().manual_seed(ctx.seed + 1))
    save_interpolation(lambda x: vae.posterior(x)[0], vae.mean_image, data, cfg.interpolation_steps,
                       ctx.out_dir / "interpolation.png")
    with torch.no_grad():
        recon = vae.mean_image(vae.posterior(data.test[:8])[0])
    _save_reconstructions(data, recon, ctx.out_dir / "reconstructions.png")
    metrics = {
        **figures,
        "likelihood": "discretised logistic per sub-pixel (256 levels); bits/dim = negative ELBO, discrete",
        "baseline_bits_per_dim": round(marginal_bits_per_dim(data.train_uint8, data.test_uint8), 4),
        "beta": cfg.beta,
        "final_train_bits_per_dim": final_loss(log["history"], column=2),
        **(judge_images(data, samples) if cfg.judge else {}),
        "steps": cfg.steps,
        "train_s": round(log["train_s"], 1),
    }
    return finish(ctx, {"vae": vae}, metrics, samples[:64],
                  {"interpolation": "interpolation.png", "reconstructions": "reconstructions.png"})


def _sample_vae(vae: VAE, n: int, gen: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Decode z ~ N(0, T^2 I) to the decoder's mean image (the usual VAE sample; its pixel noise left out)."""
    with torch.no_grad():
        latent = vae.decoder.head.in_features
        return vae.mean_image(temperature * torch.randn(n, latent, generator=gen))


def sample_vae(stage_dir: Path, n: int, seed: int, temperature: float = 1.0, **options) -> torch.Tensor:
    """Return n images (n, 3, S, S) in [-1, 1]: decoder means of z ~ N(0, T^2 I)."""
    cfg = load_config(stage_dir, VAEConfig)
    vae = VAE(read_stage(stage_dir)["image_size"], tuple(cfg.channels), cfg.latent_dim)
    vae.load_state_dict(load_state(stage_dir, "vae"))
    return _sample_vae(vae.eval(), n, torch.Generator().manual_seed(seed), temperature)


# ---------------------------------------------------------------- gated PixelCNN


class GatedLayer(nn.Module):
    """One gated layer of van den Oord et al. (2016): a vertical stack (rows above) and a horizontal stack
    (pixels to the left in the row), tanh·sigmoid gates, the vertical fed into the horizontal one row down.

    The first layer's horizontal stack excludes the current pixel (mask A) and has no residual.
    """

    def __init__(self, channels: int, kernel: int, first: bool, num_classes: int = 0):
        super().__init__()
        self.k, self.first = kernel, first
        self.v_conv = nn.Conv2d(channels, 2 * channels, (kernel // 2 + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, kernel // 2 + 1))
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Embedding(num_classes, 2 * channels) if num_classes else None

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None = None):
        k, height, width = self.k, v.shape[2], v.shape[3]
        v_feat = self.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # row r sees rows r-k//2 .. r
        v_down = F.pad(v_feat, (0, 0, 1, 0))[:, :, :height]  # row r sees rows < r only
        h_feat = self.h_conv(F.pad(h, (k // 2, 0, 0, 0)))  # column c sees columns c-k//2 .. c
        if self.first:
            h_feat = F.pad(h_feat, (1, 0, 0, 0))[:, :, :, :width]  # columns < c only
        h_feat = h_feat + self.v_to_h(v_down)
        if self.cond is not None and labels is not None:
            bias = self.cond(labels)[:, :, None, None]
            v_feat, h_feat = v_feat + bias, h_feat + bias
        h_new = self.h_out(self.gate(h_feat))
        return self.gate(v_feat), h_new if self.first else h + h_new


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN: input (B, in, H, W) -> (B, out, H, W), output at (r, c) a function of pixels before it in
    raster order only. `vocab` > 0: the input is a (B, H, W) map of indices, embedded first."""

    def __init__(self, in_channels: int, channels: int, layers: int, kernel: int, out_channels: int,
                 vocab: int = 0, num_classes: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, channels) if vocab else None
        self.inp = nn.Conv2d(in_channels, channels, 1) if not vocab else None
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, i == 0, num_classes) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, 4 * channels, 1), nn.ReLU(),
                                  nn.Conv2d(4 * channels, out_channels, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x).permute(0, 3, 1, 2) if self.embed is not None else self.inp(x)
        v = h
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)


# ---------------------------------------------------------------- pixelcnn (pixels)


def pixelcnn_nll(net: GatedPixelCNN, x: torch.Tensor, mixtures: int, labels=None) -> torch.Tensor:
    """Return the exact NLL (nats) per image (B,) of x (on the 256 levels) under the PixelCNN."""
    return -mixture_log_prob(x, net(x, labels), mixtures).flatten(1).sum(1)


@torch.no_grad()
def pixelcnn_generate(net: GatedPixelCNN, n: int, size: int, mixtures: int, gen: torch.Generator,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Return n images sampled pixel by pixel in raster order (the net runs on the rows up to the current one)."""
    x = torch.zeros(n, 3, size, size)
    for r in range(size):
        for c in range(size):
            params = net(x[:, :, : r + 1], labels)[:, :, r: r + 1, c: c + 1]
            x[:, :, r: r + 1, c: c + 1] = sample_mixture(params, mixtures, gen)
    return x


def run_pixelcnn(ctx: StageContext) -> StageResult:
    """Train the gated PixelCNN on pixels; report the exact test NLL in bits/dim; sample."""
    cfg: PixelCNNConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    classes = data.num_classes if cfg.conditional else 0
    net = GatedPixelCNN(3, cfg.channels, cfg.layers, cfg.kernel, 10 * cfg.mixtures, num_classes=classes)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    train, dims = data.train, data.dims

    def step(i: int) -> dict[str, float]:
        idx = batch_indices(len(train), cfg.batch_size, gen)
        labels = data.train_labels[idx] if classes else None
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * i / max(1, cfg.steps))))
        nll = pixelcnn_nll(net, train[idx], cfg.mixtures, labels).mean()
        opt.zero_grad(set_to_none=True)
        (nll / dims).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        return {"bits_per_dim": bits_per_dim_discrete(nll.item(), dims)}

    log = train_loop(ctx, "pixelcnn", {"pixelcnn": net}, {"adam": opt}, cfg.steps, step, gen, cfg.checkpoint_every)
    with torch.no_grad():
        total = sum(float(pixelcnn_nll(net, data.test[s], cfg.mixtures,
                                       data.test_labels[s] if classes else None).sum())
                    for s in batches(len(data.test), 128))
    gen_s = torch.Generator().manual_seed(ctx.seed + 1)
    n = cfg.sample_count
    labels = torch.arange(n) % data.num_classes if classes else None
    samples = pixelcnn_generate(net, n, data.image_size, cfg.mixtures, gen_s, labels)
    metrics = {
        "test_bits_per_dim": round(bits_per_dim_discrete(total, dims * len(data.test)), 4),
        "baseline_bits_per_dim": round(marginal_bits_per_dim(data.train_uint8, data.test_uint8), 4),
        "likelihood": f"discretised logistic mixture ({cfg.mixtures}) per pixel, exact, discrete",
        "final_train_bits_per_dim": final_loss(log["history"]),
        **(judge_images(data, samples, labels) if cfg.judge else {}),
        "judged_samples": n if cfg.judge else 0,
        "steps": cfg.steps,
        "train_s": round(log["train_s"], 1),
    }
    return finish(ctx, {"pixelcnn": net}, metrics, samples[:64], extra_config={"num_classes": classes})


def sample_pixelcnn(stage_dir: Path, n: int, seed: int, label: int | None = None, **options) -> torch.Tensor:
    """Return n images (n, 3, S, S) on the 256 levels sampled from the PixelCNN (class `label` if conditional)."""
    cfg = load_config(stage_dir, PixelCNNConfig)
    size = read_stage(stage_dir)["image_size"]
    classes = read_stage(stage_dir).get("num_classes", 0)
    if label is not None and not classes:
        raise ValueError("--label: this PixelCNN is unconditional (train it with conditional=true)")
    net = GatedPixelCNN(3, cfg.channels, cfg.layers, cfg.kernel, 10 * cfg.mixtures, num_classes=classes)
    net.load_state_dict(load_state(stage_dir, "pixelcnn"))
    labels = (torch.full((n,), label) if label is not None else torch.arange(n) % classes) if classes else None
    return pixelcnn_generate(net.eval(), n, size, cfg.mixtures, torch.Generator().manual_seed(seed), labels)


# ---------------------------------------------------------------- vq-vae + pixelcnn prior


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with an EMA codebook (van den Oord et al. 2017, appendix; decay 0.99),
    a straight-through gradient, and restarts of codes unused for a while from random encoder outputs."""

    def __init__(self, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5, usage_decay: float = 0.95):
        super().__init__()
        self.decay, self.eps, self.usage_decay = decay, eps, usage_decay  # usage: a short window (~20 steps)
        self.register_buffer("codebook", torch.zeros(size, dim))
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("usage", torch.zeros(size))  # EMA of each code's share of the assignments
        self.register_buffer("initialised", torch.zeros(()))

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Return the nearest code (B, h, w) of each vector of z (B, D, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the code vectors (B, D, h, w) of indices (B, h, w)."""
        return self.codebook[idx].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, gen: torch.Generator | None = None, restart: bool = False):
        """Return (quantised z with the straight-through gradient, indices, commitment MSE); update the EMA
        codebook in training."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.training and not bool(self.initialised):  # codebook from encoder outputs (k-means++-free init)
            pick = torch.randint(0, len(flat), (len(self.codebook),), generator=gen)
            self.codebook.copy_(flat[pick])
            self.embed_sum.copy_(flat[pick])
            self.cluster_size.fill_(1.0)
            self.usage.fill_(1.0 / len(self.codebook))
            self.initialised.fill_(1.0)
        idx = self.indices(z)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx.flatten(), len(self.codebook)).float()
                counts = onehot.sum(0)
                self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(onehot.T @ flat, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                size = (self.cluster_size + self.eps) / (n + len(self.codebook) * self.eps) * n
                self.codebook.copy_(self.embed_sum / size[:, None])
                self.usage.mul_(self.usage_decay).add_(counts / counts.sum(), alpha=1 - self.usage_decay)
                dead = self.usage < 0.03 / len(self.codebook)
                if restart and bool(dead.any()):
                    pick = torch.randint(0, len(flat), (int(dead.sum()),), generator=gen)
                    self.codebook[dead] = flat[pick]
                    self.embed_sum[dead] = flat[pick]
                    self.cluster_size[dead] = 1.0
                    self.usage[dead] = 1.0 / len(self.codebook)
        q = self.lookup(idx)
        commit = F.mse_loss(z, q.detach())
        return z + (q - z).detach(), idx, commit


class VQVAE(nn.Module):
    """Conv encoder to a (code_dim, s, s) map, vector quantiser, conv decoder to a discretised logistic."""

    def __init__(self, image_size: int, channels: tuple[int, ...], code_dim: int, codebook_size: int):
        super().__init__()
        self.encoder = Encoder(image_size, channels, code_dim, spatial=True)
        self.quantizer = VectorQuantizer(codebook_size, code_dim)
        self.decoder = Decoder(image_size, channels, code_dim, 6, spatial=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Return the code indices (B, s, s) of images."""
        return self.quantizer.indices(self.encoder(x))

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the decoder's mean images of code indices (B, s, s)."""
        return split_logistic(self.decoder(self.quantizer.lookup(idx)))[0].clamp(-1, 1)


def code_statistics(idx: torch.Tensor, size: int) -> dict:
    """Return the share of codes used and the perplexity exp(H) of the code histogram of indices."""
    p = torch.bincount(idx.flatten(), minlength=size).float()
    p = p / p.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": round(float((p > 0).float().mean()), 4),
            "codebook_perplexity": round(float(entropy.exp()), 2)}


def unigram_bits(train_codes: torch.Tensor, test_codes: torch.Tensor, size: int) -> float:
    """Return the bits per test code of the code histogram of the train codes (add-one smoothed): the prior's
    trivial baseline."""
    counts = torch.bincount(train_codes.flatten(), minlength=size).float() + 1
    return float(-(counts / counts.sum()).log2()[test_codes.flatten()].mean())


def run_vqvae_pixelcnn(ctx: StageContext) -> StageResult:
    """Train the VQ-VAE, then a gated PixelCNN prior on its training codes; report PSNR, codebook use, bits/dim."""
    cfg: VQVAEPixelCNNConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    vq = VQVAE(data.image_size, tuple(cfg.channels), cfg.code_dim, cfg.codebook_size)
    opt = torch.optim.Adam(list(vq.encoder.parameters()) + list(vq.decoder.parameters()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    train, dims = data.train, data.dims

    def vq_step(i: int) -> dict[str, float]:
        x = train[batch_indices(len(train), cfg.batch_size, gen)]
        restart = cfg.dead_code_restart and i < 2 * cfg.vq_steps // 3
        q, _, commit = vq.quantizer(vq.encoder(x), gen, restart)
        nll = logistic_nll(x, vq.decoder(q)).mean() / dims
        loss = nll + cfg.commitment * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"recon_bits_per_dim": nll.item() / math.log(2), "commitment": commit.item()}

    vq_log = train_loop(ctx, "vqvae", {"vqvae": vq}, {"adam": opt}, cfg.vq_steps, vq_step, gen, cfg.checkpoint_every)
    with torch.no_grad():
        train_codes = torch.cat([vq.encode(train[s]) for s in batches(len(train), 256)])
        test_codes = torch.cat([vq.encode(data.test[s]) for s in batches(len(data.test), 256)])
        recon_nll = sum(float(logistic_nll(data.test[s], vq.decoder(vq.quantizer.lookup(test_codes[s]))).sum())
                        for s in batches(len(data.test), 256))
        recon = torch.cat([vq.decode(test_codes[s]) for s in batches(len(data.test), 256)])

    prior = GatedPixelCNN(0, cfg.prior_channels, cfg.prior_layers, cfg.prior_kernel, cfg.codebook_size,
                          vocab=cfg.codebook_size)
    prior_opt = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
    codes_per_image = train_codes[0].numel()

    def prior_step(i: int) -> dict[str, float]:
        c = train_codes[batch_indices(len(train_codes), cfg.batch_size, gen)]
        nll = F.cross_entropy(prior(c), c)  # nats per code
        prior_opt.zero_grad(set_to_none=True)
        nll.backward()
        prior_opt.step()
        return {"bits_per_code": nll.item() / math.log(2)}

    prior_log = train_loop(ctx, "prior", {"prior": prior}, {"adam": prior_opt}, cfg.prior_steps, prior_step, gen,
                           cfg.checkpoint_every)
    with torch.no_grad():
        code_nll = sum(float(F.cross_entropy(prior(test_codes[s]), test_codes[s], reduction="sum"))
                       for s in batches(len(test_codes), 256))
    n_test = len(data.test)
    samples = _sample_vqvae(vq, prior, judge_sample_count(data), torch.Generator().manual_seed(ctx.seed + 1))
    _save_reconstructions(data, recon, ctx.out_dir / "reconstructions.png")
    metrics = {
        "test_psnr_db": round(psnr_db(recon, data.test), 3),
        **code_statistics(test_codes, cfg.codebook_size),
        "train_codebook_usage": code_statistics(train_codes, cfg.codebook_size)["codebook_usage"],
        "code_grid": list(train_codes.shape[1:]),
        "prior_bits_per_code": round(code_nll / (n_test * codes_per_image * math.log(2)), 4),
        "uniform_bits_per_code": round(math.log2(cfg.codebook_size), 4),
        "unigram_bits_per_code": round(unigram_bits(train_codes, test_codes, cfg.codebook_size), 4),
        "prior_bits_per_dim": round(bits_per_dim_discrete(code_nll, dims * n_test), 4),
        "recon_bits_per_dim": round(bits_per_dim_discrete(recon_nll, dims * n_test), 4),
        "test_bits_per_dim": round(bits_per_dim_discrete(code_nll + recon_nll, dims * n_test), 4),
        "baseline_bits_per_dim": round(marginal_bits_per_dim(data.train_uint8, data.test_uint8), 4),
        "likelihood": "-log p(codes) under the PixelCNN prior - log p(x | codes), discretised logistic; discrete",
        "final_recon_bits_per_dim": final_loss(vq_log["history"]),
        "final_train_bits_per_code": final_loss(prior_log["history"]),
        **(judge_images(data, samples) if cfg.judge else {}),
        "train_s": round(vq_log["train_s"] + prior_log["train_s"], 1),
    }
    return finish(ctx, {"vqvae": vq, "prior": prior}, metrics, samples[:64], {"reconstructions": "reconstructions.png"})


@torch.no_grad()
def _sample_vqvae(vq: VQVAE, prior: GatedPixelCNN, n: int, gen: torch.Generator) -> torch.Tensor:
    """Sample code grids from the prior in raster order and decode them."""
    side = vq.decoder.side
    codes = torch.zeros(n, side, side, dtype=torch.long)
    for r in range(side):
        for c in range(side):
            logits = prior(codes[:, : r + 1])[:, :, r, c]
            codes[:, r, c] = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen)[:, 0]
    return vq.decode(codes)


def sample_vqvae_pixelcnn(stage_dir: Path, n: int, seed: int, **options) -> torch.Tensor:
    """Return n images (n, 3, S, S) in [-1, 1]: code grids from the PixelCNN prior, decoded."""
    cfg = load_config(stage_dir, VQVAEPixelCNNConfig)
    vq = VQVAE(read_stage(stage_dir)["image_size"], tuple(cfg.channels), cfg.code_dim, cfg.codebook_size)
    vq.load_state_dict(load_state(stage_dir, "vqvae"))
    prior = GatedPixelCNN(0, cfg.prior_channels, cfg.prior_layers, cfg.prior_kernel, cfg.codebook_size,
                          vocab=cfg.codebook_size)
    prior.load_state_dict(load_state(stage_dir, "prior"))
    return _sample_vqvae(vq.eval(), prior.eval(), n, torch.Generator().manual_seed(seed))
