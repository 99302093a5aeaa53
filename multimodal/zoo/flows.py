"""Normalizing flows of the model zoo: RealNVP and Glow, trained by exact maximum likelihood.

Both model the density of a uniformly dequantised image y = (x + u) / 256,
u ~ U[0, 1)^D, on the unit cube: y is mapped to the flow's input v by a fixed
pre-processing (`logit`: v = logit(α + (1 − 2α) y), RealNVP's; `affine`:
v = y − ½, Glow's), the flow maps v to latents z, and

    log p(y) = log N(z) + log|det ∂z/∂v| + log|det ∂v/∂y|

is exact, so −log p(y) in bits per dimension (+ 8 for the 1/256 bins) is an
upper bound on the discrete test NLL (the variational dequantisation bound).

Layers (each `forward(x) -> (y, logdet per sample)` and `inverse(y) -> x`):
`AffineCoupling` with a checkerboard or channel-wise mask (RealNVP:
y_b = x_b · exp(s(x_a)) + t(x_a), s = scale · tanh(·)), `Squeeze` (2×2 space to
depth), `ActNorm` (per-channel affine with data-dependent init), `InvConv1x1`
(LU-decomposed or plain with slogdet), `GlowCoupling` (channel halves,
sigmoid scale). `Split` factors out half the channels (multi-scale), with a
standard normal (RealNVP) or a learned conditional Gaussian prior (Glow).
Sampling runs the flow backwards from latents drawn at a temperature T
(N(0, T²), or N(μ, (Tσ)²) for learned priors).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor | None = None, logsd: torch.Tensor | None = None) -> torch.Tensor:
    """Return Σ log N(z; mean, exp(logsd)²) over all but the batch dimension (standard normal when None)."""
    if mean is None:
        lp = -0.5 * (z ** 2 + LOG_2PI)
    else:
        lp = -0.5 * (((z - mean) * torch.exp(-logsd)) ** 2 + LOG_2PI) - logsd
    return lp.flatten(1).sum(1)


# ------------------------------------------------------------------ pre-processing


class Preprocess(nn.Module):
    """The fixed map of the dequantised unit cube y ∈ (0, 1)^D to the flow's input v, with its log-det."""

    def __init__(self, kind: str = "logit", alpha: float = 0.05):
        super().__init__()
        if kind not in ("logit", "affine"):
            raise ValueError(f"preprocess must be logit or affine, not {kind!r}")
        self.kind, self.alpha = kind, alpha

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "affine":
            return y - 0.5, y.new_zeros(len(y))
        p = self.alpha + (1 - 2 * self.alpha) * y
        v = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return v, logdet

    def inverse(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "affine":
            return v + 0.5
        return (torch.sigmoid(v) - self.alpha) / (1 - 2 * self.alpha)


def dequantize(x_uint8: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Return y = (x + u) / 256 with u ~ U[0, 1)^D: images (N, C, H, W) uint8 → float in (0, 1)."""
    u = torch.rand(x_uint8.shape, generator=gen)
    return (x_uint8.float() + u) / 256.0


def to_images(y: torch.Tensor) -> torch.Tensor:
    """Return unit-cube samples y as images in [-1, 1] (quantised to the 256 bins; a non-finite value, from an
    inverse coupling overflowing at a high temperature, becomes black)."""
    y = torch.nan_to_num(y, nan=0.0, posinf=1.0, neginf=0.0)
    x = torch.floor(y.clamp(0, 1) * 256).clamp(0, 255)
    return x / 127.5 - 1.0


# ------------------------------------------------------------------ layers


def checkerboard(h: int, w: int, parity: int) -> torch.Tensor:
    """Return the (1, 1, H, W) 0/1 mask of pixels with (i + j) % 2 == parity."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j) % 2 == parity).float()[None, None]


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class CouplingNet(nn.Module):
    """conv3×3 → ReLU → conv1×1 → residual blocks → ReLU → zero-initialised conv3×3 (every coupling starts as the identity)."""

    def __init__(self, c_in: int, c_out: int, hidden: int, blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(c_in, hidden, 3, padding=1)
        self.mid = nn.Conv2d(hidden, hidden, 1)
        self.blocks = nn.Sequential(*[ResBlock(hidden) for _ in range(blocks)])
        self.out = nn.Conv2d(hidden, c_out, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.blocks(self.mid(F.relu(self.inp(x))))))


class AffineCoupling(nn.Module):
    """RealNVP's affine coupling: y = b⊙x + (1−b)⊙(x·exp(s) + t), (s, t) = net(b⊙x), s = scale·tanh(·).

    mask "checkerboard" (parity 0/1: which pixels condition) or "channel" (parity 0: the first
    half of the channels conditions the second, 1: the reverse).
    """

    def __init__(self, channels: int, mask: str, parity: int, hidden: int, blocks: int):
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(mask)
        self.mask, self.parity, self.channels = mask, parity, channels
        if mask == "checkerboard":
            c_in, self.c_out = channels + 1, channels  # the mask itself is an input channel (tells the net the parity)
        else:
            c_in = channels // 2 if parity == 0 else channels - channels // 2
            self.c_out = channels - c_in
        self.net = CouplingNet(c_in, 2 * self.c_out, hidden, blocks)
        self.scale = nn.Parameter(torch.ones(1, self.c_out, 1, 1))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.channels // 2
        a, b = x[:, :half], x[:, half:]
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b] if self.parity == 0 else [b, a], dim=1)

    def _st(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(cond).chunk(2, dim=1)
        return self.scale * torch.tanh(s), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask == "checkerboard":
            b = checkerboard(x.shape[2], x.shape[3], self.parity).to(x)
            s, t = self._st(torch.cat([x * b, b.expand(len(x), 1, -1, -1)], dim=1))
            s, t = s * (1 - b), t * (1 - b)
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        a, xb = self._split(x)
        s, t = self._st(a)
        return self._join(a, xb * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mask == "checkerboard":
            b = checkerboard(y.shape[2], y.shape[3], self.parity).to(y)
            s, t = self._st(torch.cat([y * b, b.expand(len(y), 1, -1, -1)], dim=1))
            s, t = s * (1 - b), t * (1 - b)
            return (y - t) * torch.exp(-s)
        a, yb = self._split(y)
        s, t = self._st(a)
        return self._join(a, (yb - t) * torch.exp(-s))


class Squeeze(nn.Module):
    """(C, H, W) → (4C, H/2, W/2): each 2×2 patch becomes four channels (volume preserving)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)
        return y, x.new_zeros(n)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        n, c4, h, w = y.shape
        c = c4 // 4
        return y.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * 2, w * 2)


class ActNorm(nn.Module):
    """Per-channel y = (x + bias) · exp(logs), initialised from the first batch to zero mean, unit variance."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            self.initialize(x)
        logdet = self.logs.sum() * x.shape[2] * x.shape[3]
        return (x + self.bias) * torch.exp(self.logs), logdet.expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Glow's invertible 1×1 convolution, W initialised to a random rotation.

    lu=True: W = P · (L + I) · (U + diag(sign · exp(log_s))) with P fixed, log|det W| = Σ log_s;
    lu=False: W a free matrix, log|det W| from slogdet. Either way the log-det is H·W·log|det W|.
    """

    def __init__(self, channels: int, lu: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        w, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        self.lu = lu
        if not lu:
            self.weight = nn.Parameter(w)
            return
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return W (C, C) and log|det W|."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, logdet = self.matrix()
        y = F.conv2d(x, w[:, :, None, None])
        return y, (logdet * x.shape[2] * x.shape[3]).expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w, _ = self.matrix()
        return F.conv2d(y, torch.linalg.inv(w)[:, :, None, None])


class GlowNet(nn.Module):
    """Glow's coupling net: conv3×3 → ReLU → conv1×1 → ReLU → zero-initialised conv3×3."""

    def __init__(self, c_in: int, c_out: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, c_out, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv2(F.relu(self.conv1(x)))))


class GlowCoupling(nn.Module):
    """Glow's affine coupling: x_a conditions y_b = (x_b + t) · sigmoid(s + 2)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.half = channels // 2
        self.net = GlowNet(self.half, 2 * (channels - self.half), hidden)

    def _st(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, t = self.net(a).chunk(2, dim=1)
        return torch.sigmoid(raw + 2.0), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, :self.half], x[:, self.half:]
        scale, t = self._st(a)
        return torch.cat([a, (b + t) * scale], dim=1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y[:, :self.half], y[:, self.half:]
        scale, t = self._st(a)
        return torch.cat([a, b / scale - t], dim=1)


class Split(nn.Module):
    """Factor out the first half of the channels as latents (multi-scale); the rest flows on.

    Prior of the factored-out half: N(0, I), or (learned) N(μ, σ²) with (μ, log σ) from a
    zero-initialised conv3×3 of the kept half (Glow).
    """

    def __init__(self, channels: int, learned: bool = False):
        super().__init__()
        self.out = channels // 2
        self.prior = None
        if learned:
            self.prior = nn.Conv2d(channels - self.out, 2 * self.out, 3, padding=1)
            nn.init.zeros_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)

    def stats(self, keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.prior is None:
            return None, None
        mean, logsd = self.prior(keep).chunk(2, dim=1)
        return mean, logsd

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (kept half, factored-out latents, their log-prior per sample)."""
        z, keep = x[:, :self.out], x[:, self.out:]
        mean, logsd = self.stats(keep)
        return keep, z, gaussian_log_prob(z, mean, logsd)

    def merge(self, keep: torch.Tensor, z: torch.Tensor | None, temperature: float = 1.0,
              gen: torch.Generator | None = None) -> torch.Tensor:
        """Inverse of split; draws z from the prior at `temperature` where z is None."""
        if z is None:
            mean, logsd = self.stats(keep)
            eps = torch.randn((len(keep), self.out, *keep.shape[2:]), generator=gen).to(keep)
            z = temperature * eps if mean is None else mean + temperature * torch.exp(logsd) * eps
        return torch.cat([z, keep], dim=1)


# ------------------------------------------------------------------ flows


class Flow(nn.Module):
    """A multi-scale flow: pre-processing, then a list of bijections and Splits; the top latents are N(0, I)."""

    def __init__(self, layers: list[nn.Module], shape: tuple[int, int, int], preprocess: Preprocess):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.shape = tuple(shape)
        self.preprocess = preprocess
        with torch.no_grad():
            probe = torch.zeros(1, *shape)
            for layer in self.layers:
                probe = layer.split(probe)[0] if isinstance(layer, Split) else layer_shape(layer, probe)
        self.top_shape = tuple(probe.shape[1:])

    @property
    def dims(self) -> int:
        return int(np.prod(self.shape))

    def encode(self, v: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Map flow inputs v (N, C, H, W) to latents; return (latents, Σ log-dets, Σ log-priors) per sample."""
        zs, logdet, logprior = [], v.new_zeros(len(v)), v.new_zeros(len(v))
        h = v
        for layer in self.layers:
            if isinstance(layer, Split):
                h, z, lp = layer.split(h)
                zs.append(z)
                logprior = logprior + lp
            else:
                h, ld = layer(h)
                logdet = logdet + ld
        zs.append(h)
        return zs, logdet, logprior + gaussian_log_prob(h)

    def decode(self, zs: list[torch.Tensor] | None = None, n: int = 0, temperature: float = 1.0,
               gen: torch.Generator | None = None) -> torch.Tensor:
        """Inverse of encode: latents → flow inputs v; draws every latent at `temperature` where zs is None."""
        param = next(self.parameters())
        if zs is None:
            h = temperature * torch.randn((n, *self.top_shape), generator=gen).to(param)
            rest: list[torch.Tensor | None] = []
        else:
            h, rest = zs[-1], list(zs[:-1])
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                h = layer.merge(h, rest.pop() if rest else None, temperature, gen)
            else:
                h = layer.inverse(h)
        return h

    def log_prob_unit_cube(self, y: torch.Tensor) -> torch.Tensor:
        """Return log p(y) (nats per sample) of dequantised images y ∈ (0, 1)^D, every log-det included."""
        v, ld_pre = self.preprocess(y)
        _, logdet, logprior = self.encode(v)
        return logprior + logdet + ld_pre

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, gen: torch.Generator | None = None) -> torch.Tensor:
        """Return n samples on the unit cube (N, C, H, W)."""
        return self.preprocess.inverse(self.decode(n=n, temperature=temperature, gen=gen))


def layer_shape(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return a zero probe passed through `layer` (shapes only; ActNorm left uninitialised)."""
    if isinstance(layer, Squeeze):
        return layer(x)[0]
    return x  # every other bijection keeps the shape


def build_realnvp(cfg, shape: tuple[int, int, int] = (3, 16, 16)) -> Flow:
    """Return RealNVP: per level (but the last) 3 checkerboard couplings, squeeze, 3 channel couplings,
    factor out half; the last level `final_couplings` checkerboard couplings."""
    c, h, w = shape
    layers: list[nn.Module] = []
    for level in range(cfg.scales):
        if level == cfg.scales - 1:
            layers += [AffineCoupling(c, "checkerboard", i % 2, cfg.hidden, cfg.blocks) for i in range(cfg.final_couplings)]
            break
        layers += [AffineCoupling(c, "checkerboard", i % 2, cfg.hidden, cfg.blocks) for i in range(3)]
        layers.append(Squeeze())
        c, h, w = c * 4, h // 2, w // 2
        layers += [AffineCoupling(c, "channel", i % 2, cfg.hidden, cfg.blocks) for i in range(3)]
        layers.append(Split(c, learned=False))
        c -= c // 2
    return Flow(layers, shape, Preprocess(cfg.preprocess, cfg.logit_alpha))


def build_glow(cfg, shape: tuple[int, int, int] = (3, 16, 16), seed: int = 0) -> Flow:
    """Return Glow: per level squeeze, K × (actnorm, invertible 1×1 conv, affine coupling), split (but the last)."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    layers: list[nn.Module] = []
    for level in range(cfg.levels):
        layers.append(Squeeze())
        c, h, w = c * 4, h // 2, w // 2
        for _ in range(cfg.steps_per_level):
            layers += [ActNorm(c), InvConv1x1(c, cfg.lu_decomposed, gen), GlowCoupling(c, cfg.hidden)]
        if level < cfg.levels - 1:
            layers.append(Split(c, learned=cfg.learned_prior))
            c -= c // 2
    return Flow(layers, shape, Preprocess(cfg.preprocess, cfg.logit_alpha))


BUILDERS = {"realnvp": build_realnvp, "glow": build_glow}


def build_flow(name: str, cfg, shape: tuple[int, int, int] = (3, 16, 16)) -> Flow:
    """Return the flow of recipe `name` ("realnvp" | "glow") for its config."""
    return BUILDERS[name](cfg, shape)


@torch.no_grad()
def initialize_actnorms(flow: Flow, y: torch.Tensor) -> None:
    """Data-dependent init of every ActNorm from one batch y of dequantised images (no-op without ActNorms)."""
    flow.log_prob_unit_cube(y)


# ------------------------------------------------------------------ likelihood


def bits_per_dim(nll_nats_unit_cube: torch.Tensor | float, dims: int) -> float:
    """Return bits/dim of the 0..255 data for a mean NLL (nats per image) of the density on y = (x + u) / 256."""
    return float(nll_nats_unit_cube) / (dims * math.log(2)) + 8.0


@torch.no_grad()
def heldout_nll(flow: Flow, images: torch.Tensor, seed: int, batch_size: int = 256) -> float:
    """Return the mean −log p(y) (nats per image) of uint8 images (N, C, H, W) under one dequantisation each."""
    gen = torch.Generator().manual_seed(seed)
    device = next(flow.parameters()).device
    total = 0.0
    for s in range(0, len(images), batch_size):
        y = dequantize(images[s: s + batch_size], gen).to(device)
        total += -flow.log_prob_unit_cube(y).double().sum().item()
    return total / len(images)


def gaussian_baseline_nll(train: torch.Tensor, test: torch.Tensor, seed: int) -> float:
    """Return the mean test −log p(y) (nats per image) of independent per-dimension Gaussians fitted on
    dequantised train images (N, C, H, W) uint8."""
    gen = torch.Generator().manual_seed(seed)
    y_train = dequantize(train, gen).double().flatten(1)
    y_test = dequantize(test, gen).double().flatten(1)
    mean, std = y_train.mean(0), y_train.std(0)
    return float(-gaussian_log_prob(y_test, mean, torch.log(std)).mean())


def histogram_baseline_bpd(train: torch.Tensor, test: torch.Tensor) -> float:
    """Return the test bits/dim of independent per-dimension 256-bin histograms (add-one smoothed) of train."""
    tr = train.flatten(1).long().numpy()
    te = test.flatten(1).long().numpy()
    d = tr.shape[1]
    counts = np.ones((d, 256))
    np.add.at(counts, (np.tile(np.arange(d), len(tr)), tr.reshape(-1)), 1)
    probs = counts / counts.sum(1, keepdims=True)
    return float(-np.log2(probs[np.arange(d)[None, :], te]).mean())


# ------------------------------------------------------------------ training


def lr_factor(step: int, total: int, warmup: int = 100) -> float:
    """Return the learning-rate multiplier: linear warmup, then cosine down to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def make_step(flow: Flow, opt: torch.optim.Optimizer, cfg, train: torch.Tensor, gen: torch.Generator):
    """Return step_fn(step) -> {"bpd"}: one Adam step on a freshly dequantised batch, loss = mean bits/dim."""
    batch = min(cfg.batch_size, len(train))
    dims = int(np.prod(train.shape[1:]))
    device = next(flow.parameters()).device

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(len(train), (batch,), generator=gen)
        y = dequantize(train[idx], gen).to(device)
        loss = -flow.log_prob_unit_cube(y).mean() / (dims * math.log(2)) + 8.0
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
        opt.step()
        return {"bpd": loss.item()}

    return step_fn


def prepare_training(flow: Flow, cfg, train: torch.Tensor, seed: int) -> tuple[torch.optim.Optimizer, torch.Generator]:
    """Move the flow to cfg.device, initialise its ActNorms from 512 training images; return (Adam, the loop's generator)."""
    flow.to(cfg.device)
    gen = torch.Generator().manual_seed(seed)
    init_idx = torch.randperm(len(train), generator=gen)[: min(512, len(train))]
    initialize_actnorms(flow, dequantize(train[init_idx], gen).to(cfg.device))  # a resume overwrites these weights
    return torch.optim.Adam(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), gen


def train_flow(flow: Flow, cfg, train: torch.Tensor, seed: int) -> dict:
    """Train `flow` on uint8 images (N, C, H, W) without checkpoints (tests); return {history, train_s}."""
    opt, gen = prepare_training(flow, cfg, train, seed)
    step_fn = make_step(flow, opt, cfg, train, gen)
    started = time.time()
    flow.train()
    history = [[step, step_fn(step)["bpd"]] for step in range(cfg.steps)]
    flow.eval()
    return {"history": history, "train_s": time.time() - started}


# ------------------------------------------------------------------ the stages


def temperature_grid(flow: Flow, temperatures, per_row: int, seed: int) -> torch.Tensor:
    """Return (len(temperatures) · per_row, 3, S, S) samples in [-1, 1]: one row per temperature, the same noise seeds."""
    rows = [to_images(flow.sample(per_row, t, torch.Generator().manual_seed(seed)).cpu()) for t in temperatures]
    return torch.cat(rows)


def run_flow(ctx, name: str):
    """Train the flow `name` on the train split; report exact test bits/dim, baselines, FID-like per temperature."""
    from multimodal.pictures import save_grid
    from multimodal.zoo.common import (bits_per_dim_continuous, final_loss, finish, judge_images,
                                       judge_sample_count, load_data, train_loop)

    cfg = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    dims = data.dims
    flow = build_flow(name, cfg, tuple(data.train_uint8.shape[1:]))
    opt, gen = prepare_training(flow, cfg, data.train_uint8, ctx.seed)
    step_fn = make_step(flow, opt, cfg, data.train_uint8, gen)
    log = train_loop(ctx, name, {"flow": flow}, {"adam": opt}, cfg.steps, step_fn, gen, cfg.checkpoint_every)

    started = time.time()
    test_bpd = bits_per_dim_continuous(heldout_nll(flow, data.test_uint8, ctx.seed + 1), dims)
    subset = torch.randperm(len(data.train_uint8), generator=torch.Generator().manual_seed(ctx.seed))[: len(data.test_uint8)]
    train_bpd = bits_per_dim_continuous(heldout_nll(flow, data.train_uint8[subset], ctx.seed + 1), dims)
    gauss_bpd = bits_per_dim_continuous(gaussian_baseline_nll(data.train_uint8, data.test_uint8, ctx.seed), dims)
    metrics = {
        "test_bits_per_dim": round(test_bpd, 4),
        "train_bits_per_dim": round(train_bpd, 4),  # on a random subset of train as large as the test split
        "baseline_gaussian_bits_per_dim": round(gauss_bpd, 4),  # independent per-dimension Gaussian (fit on train)
        "baseline_histogram_bits_per_dim": round(histogram_baseline_bpd(data.train_uint8, data.test_uint8), 4),
        "baseline_uniform_bits_per_dim": 8.0,
        "final_train_bits_per_dim": final_loss(log["history"]),
    }
    n = judge_sample_count(data)
    fids, nonfinite = {}, 0
    for i, t in enumerate(cfg.temperatures if cfg.judge else ()):
        y = flow.sample(n, t, torch.Generator().manual_seed(ctx.seed + 100 + i)).cpu()
        nonfinite += int((~torch.isfinite(y.flatten(1))).any(1).sum())
        judged = judge_images(data, to_images(y))
        fids[t] = judged["fid_like"]
        metrics[f"fid_like_t{t:g}"] = judged["fid_like"]
        metrics["fid_floor"] = judged["fid_floor"]
    if fids:
        best = min(fids, key=fids.get)
        metrics.update({"fid_like": fids[best], "fid_like_temperature": best,
                        "nonfinite_samples": nonfinite})  # of the judged samples, all temperatures
    grid = temperature_grid(flow, cfg.temperatures, 8, ctx.seed + 7)
    save_grid(((grid.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), ctx.out_dir / "temperatures.png", 8, 3,
              [f"T={t:g}" for t in cfg.temperatures])
    metrics.update({"steps": cfg.steps, "train_s": round(log["train_s"], 1), "eval_s": round(time.time() - started, 1)})
    return finish(ctx, {"flow": flow.cpu()}, metrics, grid, {"temperatures": "temperatures.png"})


def run_realnvp(ctx):
    """The `zoo_realnvp` stage."""
    return run_flow(ctx, "realnvp")


def run_glow(ctx):
    """The `zoo_glow` stage."""
    return run_flow(ctx, "glow")


def load_flow(stage_dir: Path) -> Flow:
    """Return the trained flow a `zoo_realnvp` / `zoo_glow` stage wrote."""
    from multimodal.zoo.common import load_config, load_state, read_stage
    from multimodal.zoo.flows_config import GlowConfig, RealNVPConfig

    record = read_stage(stage_dir)
    name = record["recipe"]
    cfg = load_config(stage_dir, {"realnvp": RealNVPConfig, "glow": GlowConfig}[name])
    size = record["image_size"]
    flow = build_flow(name, cfg, (3, size, size))
    flow.load_state_dict(load_state(stage_dir, "flow"))
    return flow.eval()


DEFAULT_TEMPERATURE = 0.7


def sample_flow(stage_dir: Path, n: int, seed: int, temperature: float = DEFAULT_TEMPERATURE,
                label: int | None = None) -> torch.Tensor:
    """Return n samples (n, 3, S, S) in [-1, 1] drawn at `temperature` (the flows are unconditional: no label)."""
    if label is not None:
        raise ValueError("the flows are unconditional: --label does not apply")
    flow = load_flow(Path(stage_dir))
    return to_images(flow.sample(n, temperature, torch.Generator().manual_seed(seed)))
