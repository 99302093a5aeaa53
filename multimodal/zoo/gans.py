"""Generative adversarial networks of the model zoo: DCGAN, WGAN-GP, a class-conditional GAN, a small
StyleGAN2, pix2pix and CycleGAN.

Every recipe trains on the train split of the t2i caption set (16x16 RGB) and reports on
the test split:

- `zoo_dcgan`: transposed-conv generator with BatchNorm, LeakyReLU conv discriminator,
  binary cross-entropy (non-saturating generator loss).
- `zoo_wgan_gp`: the same shapes, a critic without normalisation trained `critic_iters` times
  per generator step on the Wasserstein loss plus lambda·(||grad D(x_hat)|| - 1)^2 on random
  interpolates x_hat of real and generated images (Gulrajani et al. 2017).
- `zoo_cgan`: generator with class-conditional BatchNorm, spectrally normalised projection
  discriminator D(x, y) = psi(phi(x)) + <embed(y), phi(x)> (Miyato & Koyama 2018), hinge loss.
- `zoo_stylegan`: mapping MLP z -> w (equalised learning rate, lr x 0.01), synthesis from a
  learned 4x4 constant through modulated/demodulated 3x3 convs with per-layer noise inputs
  and skip toRGB outputs, style-mixing regularisation, non-saturating loss with lazy R1, an
  EMA generator for sampling (Karras et al. 2019/2020).
- `zoo_pix2pix`: U-Net generator + PatchGAN discriminator on pairs (outline, image), where the
  outline is the per-channel Sobel magnitude of the image (deterministic), L1 + adversarial.
- `zoo_cyclegan`: unpaired translation between digits drawn white-on-black (domain A) and the
  same kind of digits drawn amber-on-blue (domain B); the two domains' training images come
  from disjoint halves of the train split, so no pair is ever seen. LSGAN, cycle and
  identity losses (Zhu et al. 2017).

Unconditional generators report the judge's FID-like distance (common.judge_images) of as
many samples as the real reference holds, next to `fid_floor` (real vs real) and
`baseline_fid_like` of a trivial generator: independent Gaussian pixels with the training
set's per-pixel mean and standard deviation.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from multimodal.image_metrics import psnr, ssim
from multimodal.zoo.common import (ZooData, final_loss, finish, judge_images, judge_sample_count, load_config,
                                   load_data, load_state, read_stage, save_samples, train_loop)
from multimodal.zoo.gans_config import (CGANConfig, CycleGANConfig, DCGANConfig, Pix2PixConfig, StyleGANConfig,
                                        WGANGPConfig)
from pipeline.stage import StageContext, StageResult

EXAMPLES = "examples"  # module of held-out inputs (buffers) the translation recipes sample from
AMBER = (255, 176, 0)  # domain B of the CycleGAN recipe: ink colour
NAVY = (16, 32, 96)  # ... and background


# ---------------------------------------------------------------- shared pieces


def optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step of `optimizer` on `loss` (gradients cleared first)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def batch_indices(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Return `size` indices drawn uniformly (with replacement) from range(n)."""
    return torch.randint(0, n, (min(size, n),), generator=gen)


def upsamplings(image_size: int, base: int = 4) -> int:
    """Return how many x2 upsamplings take a base x base map to image_size (a power-of-two multiple)."""
    n = int(round(math.log2(image_size / base)))
    if base * 2 ** n != image_size or n < 1:
        raise ValueError(f"image_size {image_size} is not {base}·2^k")
    return n


class Generator(nn.Module):
    """DCGAN generator z (B, z_dim) -> (B, 3, S, S) in [-1, 1]; BatchNorm, or class-conditional BatchNorm where num_classes."""

    def __init__(self, z_dim: int, channels: int, image_size: int, num_classes: int = 0):
        super().__init__()
        self.z_dim, self.top = z_dim, channels
        self.fc = nn.Linear(z_dim, channels * 16)
        widths = [max(8, channels // 2 ** i) for i in range(upsamplings(image_size) + 1)]
        self.norms = nn.ModuleList([self._norm(widths[0], num_classes)])
        self.ups = nn.ModuleList()
        for a, b in zip(widths, widths[1:]):
            self.ups.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False))
            self.norms.append(self._norm(b, num_classes))
        self.out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    @staticmethod
    def _norm(channels: int, num_classes: int) -> nn.Module:
        return ConditionalBatchNorm(channels, num_classes) if num_classes else nn.BatchNorm2d(channels)

    def _apply_norm(self, i: int, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        norm = self.norms[i]
        return F.relu(norm(h, labels) if isinstance(norm, ConditionalBatchNorm) else norm(h))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self._apply_norm(0, self.fc(z).view(len(z), self.top, 4, 4), labels)
        for i, up in enumerate(self.ups):
            h = self._apply_norm(i + 1, up(h), labels)
        return torch.tanh(self.out(h))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; a per-class scale (around 1) and shift instead."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.bn(h) * (1 + self.gamma(labels))[:, :, None, None] + self.beta(labels)[:, :, None, None]


class Discriminator(nn.Module):
    """Conv discriminator (B, 3, S, S) -> (B,) logits (or critic values); projection term where num_classes.

    Downsamples to 4x4 (LeakyReLU 0.2, no normalisation, so a gradient penalty is per sample);
    `sn` wraps every layer in spectral normalisation; `minibatch_std` appends the standard
    deviation across groups of 4 samples as one more 4x4 feature map (ProGAN/StyleGAN), so
    the discriminator sees a batch's lack of variety (against mode dropping).
    """

    def __init__(self, channels: int, image_size: int, num_classes: int = 0, sn: bool = False,
                 minibatch_std: bool = False):
        super().__init__()
        self.minibatch_std = minibatch_std
        wrap = spectral_norm if sn else (lambda m: m)
        widths = [channels * 2 ** i for i in range(upsamplings(image_size) + 1)]
        layers: list[nn.Module] = [wrap(nn.Conv2d(3, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for a, b in zip(widths, widths[1:]):
            layers += [wrap(nn.Conv2d(a, b, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.features = (widths[-1] + int(minibatch_std)) * 16
        self.head = wrap(nn.Linear(self.features, 1))
        self.embed = wrap(nn.Embedding(num_classes, self.features)) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        if self.minibatch_std:
            h = torch.cat([h, minibatch_stddev(h)], 1)
        phi = h.flatten(1)
        out = self.head(phi)[:, 0]
        if self.embed is not None:
            out = out + (self.embed(labels) * phi).sum(1)
        return out


def minibatch_stddev(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Return (B, 1, H, W): per group of `group` samples (or the whole batch where it does not divide), the mean
    over channels and pixels of the features' standard deviation across the group, broadcast to every member."""
    b = len(h)
    g = group if b % group == 0 else b
    y = h.reshape(g, b // g, *h.shape[1:])  # sample i belongs to group i % (b // g)
    std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b // g,)
    return std.repeat(g)[:, None, None, None].expand(b, 1, *h.shape[2:])


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Return mean_i (||grad_x D(x_hat_i)||_2 - 1)^2 at x_hat = eps·real + (1 - eps)·fake (eps (B,) in [0, 1]).

    The gradient is taken with create_graph so the penalty trains the critic (WGAN-GP).
    """
    e = eps.view(-1, *([1] * (real.dim() - 1)))
    x_hat = (e * real + (1 - e) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def pixel_gaussian(train: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Return the trivial baseline: n images of independent Gaussian pixels with the train set's per-pixel mean and std."""
    mean, std = train.mean(0), train.std(0)
    return (mean + std * torch.randn((n, *train.shape[1:]), generator=gen)).clamp(-1, 1)


def baseline_fid(data: ZooData, seed: int) -> float:
    """Return the FID-like distance of the pixel-Gaussian baseline (as many images as the judge's reference)."""
    images = pixel_gaussian(data.train, judge_sample_count(data), torch.Generator().manual_seed(seed + 7))
    return judge_images(data, images)["fid_like"]


def reference_classes(data: ZooData, per_class: int = 20) -> torch.Tensor:
    """Return class ids in the mix of the judge's real reference (min(per_class, count // 2) per class)."""
    labels = data.raw["labels"]
    return torch.tensor([c for c in np.unique(labels) for _ in range(min(per_class, int((labels == c).sum()) // 2))])


def generate(generator: nn.Module, n: int, gen: torch.Generator, labels: torch.Tensor | None = None,
             batch: int = 256, temperature: float = 1.0, **kwargs) -> torch.Tensor:
    """Return n generated images (CPU) from latents z ~ N(0, temperature^2 I) drawn from `gen`, without gradients."""
    device = next(generator.parameters()).device
    z = torch.randn(n, generator.z_dim, generator=gen) * temperature
    out = []
    with torch.no_grad():
        for s in range(0, n, batch):
            lab = None if labels is None else labels[s: s + batch].to(device)
            out.append(generator(z[s: s + batch].to(device), lab, **kwargs).cpu())
    return torch.cat(out).clamp(-1, 1)


def _adam(params, lr: float, betas) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas))


def _load(stage_dir: Path, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    for name, module in modules.items():
        module.load_state_dict(load_state(stage_dir, name))
        module.eval()
    return modules


def _history_columns(history: list[list[float]], *names: str) -> dict:
    return {f"final_{name}": final_loss(history, i + 1) for i, name in enumerate(names)}


# ---------------------------------------------------------------- dcgan


def run_dcgan(ctx: StageContext) -> StageResult:
    """Train DCGAN with BCE; report the FID-like distance of its samples against the pixel-Gaussian baseline."""
    cfg: DCGANConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    G = Generator(cfg.z_dim, cfg.g_channels, data.image_size).to(cfg.device)
    D = Discriminator(cfg.d_channels, data.image_size, minibatch_std=cfg.minibatch_std).to(cfg.device)
    opt_g = _adam(G.parameters(), cfg.lr, (cfg.beta1, 0.999))
    opt_d = _adam(D.parameters(), cfg.lr, (cfg.beta1, 0.999))
    gen = torch.Generator().manual_seed(ctx.seed)
    train = data.train.to(cfg.device)

    def step(i: int) -> dict[str, float]:
        real = train[batch_indices(len(train), cfg.batch_size, gen)]
        z = torch.randn(len(real), cfg.z_dim, generator=gen).to(cfg.device)
        fake = G(z)
        loss_d = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()  # BCE: real -> 1, fake -> 0
        optimise(opt_d, loss_d)
        loss_g = F.softplus(-D(fake)).mean()  # non-saturating: -log D(G(z))
        optimise(opt_g, loss_g)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}

    log = train_loop(ctx, "gan", {"generator": G, "discriminator": D}, {"g": opt_g, "d": opt_d}, cfg.steps, step,
                     gen, cfg.checkpoint_every)
    return _finish_unconditional(ctx, data, {"generator": G.cpu(), "discriminator": D.cpu()}, log,
                                 _history_columns(log["history"], "loss_d", "loss_g"), cfg.steps)


def _finish_unconditional(ctx: StageContext, data: ZooData, modules: dict[str, nn.Module], log: dict, extra: dict,
                          steps: int, sampler=None, pictures: dict | None = None) -> StageResult:
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    samples = sampler(judge_sample_count(data), gen) if sampler else generate(modules["generator"],
                                                                              judge_sample_count(data), gen)
    metrics = {**judge_images(data, samples), "baseline_fid_like": baseline_fid(data, ctx.seed), **extra,
               "steps": steps, "train_s": round(log["train_s"], 1)}
    return finish(ctx, modules, metrics, samples[:64], pictures)


def _load_dcgan(stage_dir: Path, config_cls=DCGANConfig) -> Generator:
    cfg = load_config(stage_dir, config_cls)
    G = Generator(cfg.z_dim, cfg.g_channels, read_stage(stage_dir)["image_size"])
    return _load(stage_dir, {"generator": G})["generator"]


def unconditional(options: dict) -> float:
    """Return the latent temperature of an unconditional sampler's options; refuse a class label."""
    if options.get("label") is not None:
        raise ValueError("this GAN is unconditional: no --label (the class-conditional one is cgan)")
    return float(options.get("temperature") or 1.0)


def sample_dcgan(stage_dir: Path, n: int, seed: int, **options) -> torch.Tensor:
    """Return n DCGAN samples (n, 3, S, S) in [-1, 1] from latents drawn with `seed` (scaled by `temperature`)."""
    return generate(_load_dcgan(stage_dir), n, torch.Generator().manual_seed(seed), temperature=unconditional(options))


# ---------------------------------------------------------------- wgan-gp


def run_wgan_gp(ctx: StageContext) -> StageResult:
    """Train WGAN-GP (critic_iters critic steps per generator step, gradient penalty); report the FID-like distance."""
    cfg: WGANGPConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    G = Generator(cfg.z_dim, cfg.g_channels, data.image_size).to(cfg.device)
    D = Discriminator(cfg.d_channels, data.image_size).to(cfg.device)
    opt_g = _adam(G.parameters(), cfg.lr, cfg.betas)
    opt_d = _adam(D.parameters(), cfg.lr, cfg.betas)
    gen = torch.Generator().manual_seed(ctx.seed)
    train = data.train.to(cfg.device)

    def step(i: int) -> dict[str, float]:
        for _ in range(cfg.critic_iters):
            real = train[batch_indices(len(train), cfg.batch_size, gen)]
            z = torch.randn(len(real), cfg.z_dim, generator=gen).to(cfg.device)
            with torch.no_grad():
                fake = G(z)
            eps = torch.rand(len(real), generator=gen).to(cfg.device)
            wasserstein = D(real).mean() - D(fake).mean()
            gp = gradient_penalty(D, real, fake, eps)
            loss_d = -wasserstein + cfg.gp_weight * gp
            optimise(opt_d, loss_d)
        z = torch.randn(cfg.batch_size, cfg.z_dim, generator=gen).to(cfg.device)
        loss_g = -D(G(z)).mean()
        optimise(opt_g, loss_g)
        return {"wasserstein": wasserstein.item(), "gp": gp.item(), "loss_g": loss_g.item()}

    log = train_loop(ctx, "gan", {"generator": G, "critic": D}, {"g": opt_g, "d": opt_d}, cfg.steps, step,
                     gen, cfg.checkpoint_every, log_every=25)
    return _finish_unconditional(ctx, data, {"generator": G.cpu(), "critic": D.cpu()}, log,
                                 _history_columns(log["history"], "wasserstein", "gp"), cfg.steps)


def sample_wgan_gp(stage_dir: Path, n: int, seed: int, **options) -> torch.Tensor:
    """Return n WGAN-GP samples (n, 3, S, S) in [-1, 1] from latents drawn with `seed` (scaled by `temperature`)."""
    return generate(_load_dcgan(stage_dir, WGANGPConfig), n, torch.Generator().manual_seed(seed),
                    temperature=unconditional(options))


# ---------------------------------------------------------------- cgan


def run_cgan(ctx: StageContext) -> StageResult:
    """Train the class-conditional GAN (hinge loss); report FID-like and the judge's accuracy on the requested classes."""
    cfg: CGANConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    k = data.num_classes
    G = Generator(cfg.z_dim, cfg.g_channels, data.image_size, num_classes=k).to(cfg.device)
    D = Discriminator(cfg.d_channels, data.image_size, num_classes=k, sn=True).to(cfg.device)
    opt_g = _adam(G.parameters(), cfg.lr, cfg.betas)
    opt_d = _adam(D.parameters(), cfg.lr, cfg.betas)
    gen = torch.Generator().manual_seed(ctx.seed)
    train, labels = data.train.to(cfg.device), data.train_labels.to(cfg.device)

    def step(i: int) -> dict[str, float]:
        idx = batch_indices(len(train), cfg.batch_size, gen)
        real, y = train[idx], labels[idx]
        z = torch.randn(len(real), cfg.z_dim, generator=gen).to(cfg.device)
        fake = G(z, y)  # generated for the same classes as the real batch
        loss_d = F.relu(1 - D(real, y)).mean() + F.relu(1 + D(fake.detach(), y)).mean()
        optimise(opt_d, loss_d)
        loss_g = -D(fake, y).mean()
        optimise(opt_g, loss_g)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}

    log = train_loop(ctx, "gan", {"generator": G, "discriminator": D}, {"g": opt_g, "d": opt_d}, cfg.steps, step,
                     gen, cfg.checkpoint_every)
    G, D = G.cpu(), D.cpu()
    classes = reference_classes(data)
    samples = generate(G, len(classes), torch.Generator().manual_seed(ctx.seed + 1), classes)
    judged = judge_images(data, samples, classes)
    grid_classes = torch.arange(k).repeat_interleave(8)
    grid = generate(G, len(grid_classes), torch.Generator().manual_seed(ctx.seed + 2), grid_classes)
    save_samples(grid, ctx.out_dir / "class_grid.png", ncols=8)
    metrics = {"fid_like": judged["fid_like"], "fid_floor": judged["fid_floor"], "class_accuracy": judged["accuracy"],
               "chance_accuracy": round(1 / k, 4), "baseline_fid_like": baseline_fid(data, ctx.seed),
               **_history_columns(log["history"], "loss_d", "loss_g"), "steps": cfg.steps,
               "train_s": round(log["train_s"], 1)}
    return finish(ctx, {"generator": G, "discriminator": D}, metrics, grid[::2][:64], {"class_grid": "class_grid.png"},
                  {"num_classes": k})


def sample_cgan(stage_dir: Path, n: int, seed: int, label: int | None = None, temperature: float = 1.0,
                **options) -> torch.Tensor:
    """Return n samples of class `label` (or of classes 0, 1, 2, ... in turn) as (n, 3, S, S) in [-1, 1]."""
    cfg = load_config(stage_dir, CGANConfig)
    record = read_stage(stage_dir)
    k = record["num_classes"]
    G = _load(stage_dir, {"generator": Generator(cfg.z_dim, cfg.g_channels, record["image_size"], k)})["generator"]
    if label is not None and not 0 <= int(label) < k:
        raise ValueError(f"label {label} is not a class id 0..{k - 1}")
    labels = torch.full((n,), int(label)) if label is not None else torch.arange(n) % k
    return generate(G, n, torch.Generator().manual_seed(seed), labels, temperature=temperature)


# ---------------------------------------------------------------- stylegan


class EqualLinear(nn.Module):
    """Linear layer with an equalised learning rate: weights N(0, 1/lr_mult^2) scaled by lr_mult/sqrt(in) at run time."""

    def __init__(self, fan_in: int, fan_out: int, bias_init: float = 0.0, lr_mult: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / lr_mult)
        self.bias = nn.Parameter(torch.full((fan_out,), float(bias_init)) / lr_mult)
        self.scale, self.lr_mult = lr_mult / math.sqrt(fan_in), lr_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mult)


class MappingNetwork(nn.Module):
    """z -> w: pixel-normalised z through `layers` equalised-lr linear layers with LeakyReLU (lr x lr_mult)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mult: float = 0.01):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.layers = nn.ModuleList([EqualLinear(a, b, lr_mult=lr_mult) for a, b in zip(dims, dims[1:])])
        self.register_buffer("w_avg", torch.zeros(w_dim))  # running mean of w (truncation trick)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2) * math.sqrt(2)
        return x


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 0) -> torch.Tensor:
    """Return conv(x, w') per sample, w'_{o,i,k} = w_{o,i,k}·s_i, divided by sqrt(sum_{i,k} w'^2) where `demodulate`.

    x (B, I, H, W), weight (O, I, k, k), styles (B, I). Demodulation rescales each output
    channel so that an input of independent unit-variance entries gives unit-variance outputs.
    A grouped convolution applies every sample's own weights.
    """
    b, i, h, w = x.shape
    wt = weight[None] * styles[:, None, :, None, None]  # (B, O, I, k, k)
    if demodulate:
        wt = wt * torch.rsqrt(wt.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    out = F.conv2d(x.reshape(1, b * i, h, w), wt.reshape(-1, i, *weight.shape[2:]), padding=padding, groups=b)
    return out.reshape(b, -1, *out.shape[2:])


class ModulatedConv(nn.Module):
    """A style-modulated conv (affine w -> per-input-channel scales, bias init 1), optional x2 upsampling first."""

    def __init__(self, fan_in: int, fan_out: int, kernel: int, w_dim: int, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in, kernel, kernel))
        self.affine = EqualLinear(w_dim, fan_in, bias_init=1.0)
        self.scale = 1 / math.sqrt(fan_in * kernel * kernel)
        self.demodulate, self.up, self.padding = demodulate, up, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return modulated_conv2d(x, self.weight * self.scale, self.affine(w), self.demodulate, self.padding)


class StyledLayer(nn.Module):
    """Modulated 3x3 conv, + per-pixel noise x a learned per-layer strength, + bias, LeakyReLU x sqrt(2)."""

    def __init__(self, fan_in: int, fan_out: int, w_dim: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv(fan_in, fan_out, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_gen: torch.Generator | None = None) -> torch.Tensor:
        h = self.conv(x, w)
        shape = (len(h), 1, *h.shape[2:])
        noise = (torch.randn(shape, generator=noise_gen).to(h.device) if noise_gen is not None
                 else torch.randn(shape, device=h.device))
        h = h + self.noise_strength * noise + self.bias[:, None, None]
        return F.leaky_relu(h, 0.2) * math.sqrt(2)


class Synthesis(nn.Module):
    """Learned 4x4 constant -> styled layers (one at 4x4, two per doubling) with skip toRGB at every resolution.

    Layer j takes ws[:, j]; the toRGB after layer j takes ws[:, j] too; num_ws = number of
    styled layers.
    """

    def __init__(self, w_dim: int, channels: int, image_size: int):
        super().__init__()
        self.const = nn.Parameter(torch.randn(channels, 4, 4))
        self.layers = nn.ModuleList([StyledLayer(channels, channels, w_dim)])
        self.to_rgb = nn.ModuleList([ModulatedConv(channels, 3, 1, w_dim, demodulate=False)])
        self.rgb_at = [0]  # index of the layer after which each toRGB reads
        for _ in range(upsamplings(image_size)):
            self.layers.append(StyledLayer(channels, channels, w_dim, up=True))
            self.layers.append(StyledLayer(channels, channels, w_dim))
            self.to_rgb.append(ModulatedConv(channels, 3, 1, w_dim, demodulate=False))
            self.rgb_at.append(len(self.layers) - 1)
        self.rgb_bias = nn.Parameter(torch.zeros(len(self.to_rgb), 3))

    @property
    def num_ws(self) -> int:
        return len(self.layers)

    def forward(self, ws: torch.Tensor, noise_gen: torch.Generator | None = None) -> torch.Tensor:
        h = self.const[None].expand(len(ws), -1, -1, -1)
        rgb, r = None, 0
        for j, layer in enumerate(self.layers):
            h = layer(h, ws[:, j], noise_gen)
            if r < len(self.rgb_at) and self.rgb_at[r] == j:
                y = self.to_rgb[r](h, ws[:, j]) + self.rgb_bias[r][:, None, None]
                rgb = y if rgb is None else F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + y
                r += 1
        return rgb


class StyleGenerator(nn.Module):
    """Mapping network + synthesis; forward(z) -> images, with style mixing and truncation options."""

    def __init__(self, z_dim: int, w_dim: int, mapping_layers: int, channels: int, image_size: int,
                 mapping_lr_mult: float = 0.01):
        super().__init__()
        self.z_dim = z_dim
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, mapping_lr_mult)
        self.synthesis = Synthesis(w_dim, channels, image_size)

    def ws(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """Return per-layer styles (B, num_ws, w_dim) of latents z (all layers the same w)."""
        w = self.mapping(z)
        if truncation != 1.0:
            w = self.mapping.w_avg + truncation * (w - self.mapping.w_avg)
        return w[:, None].expand(-1, self.synthesis.num_ws, -1)

    def forward(self, z: torch.Tensor, labels=None, truncation: float = 1.0,
                noise_gen: torch.Generator | None = None) -> torch.Tensor:
        return torch.tanh(self.synthesis(self.ws(z, truncation), noise_gen))


def mix_styles(ws1: torch.Tensor, ws2: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """Return styles taking layers < cutoff[b] from ws1 and the rest from ws2 (per sample b)."""
    layer = torch.arange(ws1.shape[1], device=ws1.device)[None, :, None]
    return torch.where(layer < cutoff.to(ws1.device)[:, None, None], ws1, ws2)


def r1_penalty(D: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """Return mean_i ||grad_x D(x_i)||^2 on real images (R1, Mescheder et al. 2018)."""
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def run_stylegan(ctx: StageContext) -> StageResult:
    """Train the small StyleGAN; report the FID-like distance of its EMA generator; write a style-mixing grid."""
    cfg: StyleGANConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    G = StyleGenerator(cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.channels, data.image_size,
                       cfg.mapping_lr_mult).to(cfg.device)
    G_ema = copy.deepcopy(G)
    D = Discriminator(cfg.d_channels, data.image_size, minibatch_std=cfg.minibatch_std).to(cfg.device)
    opt_g = _adam(G.parameters(), cfg.lr, cfg.betas)
    # lazy R1: the optimiser's hyper-parameters compensate for regularising every r1_every steps (StyleGAN2)
    c = cfg.r1_every / (cfg.r1_every + 1)
    opt_d = _adam(D.parameters(), cfg.lr * c, [b ** c for b in cfg.betas])
    gen = torch.Generator().manual_seed(ctx.seed)
    train = data.train.to(cfg.device)
    num_ws = G.synthesis.num_ws

    def styles(n: int) -> torch.Tensor:
        ws = G.ws(torch.randn(n, cfg.z_dim, generator=gen).to(cfg.device))
        mixing = torch.rand(n, generator=gen) < cfg.style_mixing
        cutoff = torch.where(mixing, torch.randint(1, num_ws, (n,), generator=gen), torch.full((n,), num_ws))
        return mix_styles(ws, G.ws(torch.randn(n, cfg.z_dim, generator=gen).to(cfg.device)), cutoff)

    def step(i: int) -> dict[str, float]:
        real = train[batch_indices(len(train), cfg.batch_size, gen)]
        with torch.no_grad():
            fake = torch.tanh(G.synthesis(styles(len(real))))
        loss_d = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
        r1 = torch.zeros(())
        if i % cfg.r1_every == 0:
            r1 = r1_penalty(D, real)
            loss_d = loss_d + cfg.r1_gamma / 2 * r1 * cfg.r1_every
        optimise(opt_d, loss_d)
        ws = styles(cfg.batch_size)
        loss_g = F.softplus(-D(torch.tanh(G.synthesis(ws)))).mean()
        optimise(opt_g, loss_g)
        with torch.no_grad():
            G.mapping.w_avg.lerp_(ws[:, 0].mean(0), 0.005)
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema)
            G_ema.mapping.w_avg.copy_(G.mapping.w_avg)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "r1": r1.item()}

    modules = {"generator": G, "generator_ema": G_ema, "discriminator": D}
    log = train_loop(ctx, "gan", modules, {"g": opt_g, "d": opt_d}, cfg.steps, step, gen, cfg.checkpoint_every)
    modules = {k: m.cpu() for k, m in modules.items()}
    G_ema = modules["generator_ema"]
    save_style_mixing(G_ema, ctx.out_dir / "style_mixing.png", ctx.seed + 3)

    def sampler(n: int, g: torch.Generator) -> torch.Tensor:
        return generate(G_ema, n, g, truncation=cfg.truncation, noise_gen=g)

    return _finish_unconditional(ctx, data, modules, log, _history_columns(log["history"], "loss_d", "loss_g"),
                                 cfg.steps, sampler, {"style_mixing": "style_mixing.png"})


@torch.no_grad()
def style_mixing_grid(G: StyleGenerator, rows: int, cols: int, cutoff: int, seed: int) -> torch.Tensor:
    """Return a ((rows + 1)·(cols + 1), 3, S, S) grid: top row column sources, left column row sources, cells mixed.

    Cell (r, c) takes the coarse styles (layers < cutoff) of row source r and the fine ones of
    column source c; one noise draw for all.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows + cols, G.z_dim, generator=gen)
    ws = G.ws(z)
    noise_seed = seed + 1

    def draw(w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(G.synthesis(w, torch.Generator().manual_seed(noise_seed))).clamp(-1, 1)

    sources = draw(ws)
    size = sources.shape[-1]
    tiles = [torch.full((1, 3, size, size), -1.0), sources[rows:]]
    for r in range(rows):
        mixed = mix_styles(ws[r: r + 1].expand(cols, -1, -1), ws[rows:], torch.full((cols,), cutoff))
        tiles += [sources[r: r + 1], draw(mixed)]
    return torch.cat(tiles)


def save_style_mixing(G: StyleGenerator, path: Path, seed: int, rows: int = 5, cols: int = 6) -> Path:
    """Write the style-mixing grid (coarse styles from rows, fine from columns; cutoff after the 8x8 layers)."""
    cutoff = max(1, G.synthesis.num_ws - 2)  # the two 16x16 layers take the column's styles
    return save_samples(style_mixing_grid(G, rows, cols, cutoff, seed), path, ncols=cols + 1)


def _load_stylegan(stage_dir: Path) -> tuple[StyleGenerator, StyleGANConfig]:
    cfg = load_config(stage_dir, StyleGANConfig)
    G = StyleGenerator(cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.channels, read_stage(stage_dir)["image_size"],
                       cfg.mapping_lr_mult)
    return _load(stage_dir, {"generator_ema": G})["generator_ema"], cfg


def sample_stylegan(stage_dir: Path, n: int, seed: int, truncation: float | None = None, **options) -> torch.Tensor:
    """Return n samples of the EMA generator (n, 3, S, S) in [-1, 1]; latents and noise drawn with `seed`.

    `truncation` (or `temperature`, as the CLI names it) is psi of the truncation trick:
    w = w_avg + psi·(w - w_avg).
    """
    G, cfg = _load_stylegan(stage_dir)
    gen = torch.Generator().manual_seed(seed)
    temperature = unconditional(options) if options.get("temperature") is not None else None
    psi = cfg.truncation if truncation is None and temperature is None else float(truncation or temperature)
    return generate(G, n, gen, truncation=psi, noise_gen=gen)


# ---------------------------------------------------------------- paired / unpaired data


def outlines(images: torch.Tensor) -> torch.Tensor:
    """Return the outline of images (N, 3, S, S) in [-1, 1]: per-channel Sobel gradient magnitude, in [-1, 1].

    Deterministic; flat regions (inside a shape, the background) become black, edges keep
    their channel's colour, so filling the inside is the translation's task.
    """
    unit = (images + 1) / 2
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    kernel = torch.stack([kx, kx.T])[:, None].repeat(3, 1, 1, 1).to(images)  # (6, 1, 3, 3): x, y per channel
    grad = F.conv2d(F.pad(unit, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mag = grad.view(len(images), 3, 2, *images.shape[2:]).pow(2).sum(2).sqrt()
    return (mag * 2).clamp(0, 1) * 2 - 1


def amber_style(images: torch.Tensor) -> torch.Tensor:
    """Return white-on-black images (N, 3, S, S) in [-1, 1] redrawn amber on navy (domain B of CycleGAN)."""
    ink = (images.mean(1, keepdim=True) + 1) / 2  # grey level in [0, 1]
    a = torch.tensor(AMBER, dtype=images.dtype)[None, :, None, None] / 255
    b = torch.tensor(NAVY, dtype=images.dtype)[None, :, None, None] / 255
    return (b + ink * (a - b)) * 2 - 1


def unpaired_halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return two disjoint random halves (index tensors) of the digit images among `labels` (classes 0-9)."""
    digits = torch.nonzero(labels < 10)[:, 0]
    order = digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))]
    half = len(order) // 2
    return order[:half], order[half: 2 * half]


def unpaired_domains(images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the CycleGAN training domains from one split's digits: (A, B) from disjoint random halves.

    A: half the digits as drawn (white on black); B: the other half redrawn amber on navy,
    so no image of A has its counterpart in B.
    """
    idx_a, idx_b = unpaired_halves(labels, seed)
    return images[idx_a], amber_style(images[idx_b])


class Examples(nn.Module):
    """Held-out inputs of a translation recipe (a buffer), saved beside the weights for `sample`."""

    def __init__(self, inputs: torch.Tensor):
        super().__init__()
        self.register_buffer("inputs", inputs.clone())


def _pick(examples: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    return examples[order[torch.arange(n) % len(order)]]


def image_quality(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Return PSNR (dB, of all pixels) and mean per-image SSIM of images in [-1, 1] against targets (multimodal.image_metrics)."""
    p, t = (pred.clamp(-1, 1) + 1) / 2, (target + 1) / 2
    s = float(np.mean([ssim(a.permute(1, 2, 0), b.permute(1, 2, 0)) for a, b in zip(p, t)]))
    return {"psnr_db": round(psnr(p, t), 3), "ssim": round(s, 4)}


def translate(net: nn.Module, inputs: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Return net(inputs) on CPU in batches, without gradients."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return torch.cat([net(inputs[s: s + batch].to(device)).cpu() for s in range(0, len(inputs), batch)])


# ---------------------------------------------------------------- pix2pix


class UNet(nn.Module):
    """U-Net (B, 3, S, S) -> (B, 3, S, S) in [-1, 1]: stride-2 conv encoder, transposed-conv decoder, skips.

    Encoder: Conv-BN-LeakyReLU per level (no BN first); decoder: ConvT-BN-ReLU with dropout
    at the innermost level (the pix2pix noise), concatenating the matching encoder map.
    """

    def __init__(self, channels: int, levels: int):
        super().__init__()
        widths = [channels * 2 ** min(i, 3) for i in range(levels)]
        self.down = nn.ModuleList()
        prev = 3
        for i, w in enumerate(widths):
            self.down.append(nn.Sequential(nn.Conv2d(prev, w, 4, stride=2, padding=1),
                                           nn.BatchNorm2d(w) if i else nn.Identity(), nn.LeakyReLU(0.2)))
            prev = w
        self.up = nn.ModuleList()
        for i in reversed(range(1, levels)):
            fan_in = widths[i] if i == levels - 1 else widths[i] * 2
            self.up.append(nn.Sequential(nn.ConvTranspose2d(fan_in, widths[i - 1], 4, stride=2, padding=1),
                                         nn.BatchNorm2d(widths[i - 1]), nn.Dropout(0.5 if i == levels - 1 else 0.0),
                                         nn.ReLU()))
        self.out = nn.ConvTranspose2d(widths[0] * 2, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        for j, layer in enumerate(self.up):
            x = layer(x if j == 0 else torch.cat([x, skips[-1 - j]], 1))
        return torch.tanh(self.out(torch.cat([x, skips[0]], 1)))


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, in_channels, S, S) -> (B, 1, S/4, S/4) logits, one per overlapping patch."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1), nn.InstanceNorm2d(channels * 2, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, channels * 4, 3, padding=1), nn.InstanceNorm2d(channels * 4, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def run_pix2pix(ctx: StageContext) -> StageResult:
    """Train pix2pix on (outline, image) pairs of the train split; report PSNR/SSIM on the test split's targets."""
    cfg: Pix2PixConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    G = UNet(cfg.channels, cfg.levels).to(cfg.device)
    D = PatchDiscriminator(6, cfg.d_channels).to(cfg.device)
    opt_g = _adam(G.parameters(), cfg.lr, (cfg.beta1, 0.999))
    opt_d = _adam(D.parameters(), cfg.lr, (cfg.beta1, 0.999))
    gen = torch.Generator().manual_seed(ctx.seed)
    targets = data.train.to(cfg.device)
    sources = outlines(data.train).to(cfg.device)

    def step(i: int) -> dict[str, float]:
        idx = batch_indices(len(targets), cfg.batch_size, gen)
        x, y = sources[idx], targets[idx]
        fake = G(x)
        d_real, d_fake = D(torch.cat([x, y], 1)), D(torch.cat([x, fake.detach()], 1))
        loss_d = 0.5 * (F.softplus(-d_real).mean() + F.softplus(d_fake).mean())
        optimise(opt_d, loss_d)
        adv = F.softplus(-D(torch.cat([x, fake], 1))).mean()
        l1 = (fake - y).abs().mean()
        loss_g = adv + cfg.l1_weight * l1
        optimise(opt_g, loss_g)
        return {"loss_d": loss_d.item(), "adv": adv.item(), "l1": l1.item()}

    log = train_loop(ctx, "pix2pix", {"generator": G, "discriminator": D}, {"g": opt_g, "d": opt_d}, cfg.steps,
                     step, gen, cfg.checkpoint_every)
    G, D = G.cpu(), D.cpu()
    test_in = outlines(data.test)
    pred = translate(G, test_in)
    quality = image_quality(pred, data.test)
    mean_image = data.train.mean(0, keepdim=True).expand_as(data.test)
    metrics = {"test_psnr_db": quality["psnr_db"], "test_ssim": quality["ssim"],
               "baseline_input_psnr_db": image_quality(test_in, data.test)["psnr_db"],
               "baseline_mean_psnr_db": image_quality(mean_image, data.test)["psnr_db"],
               **_history_columns(log["history"], "loss_d", "adv", "l1"), "steps": cfg.steps,
               "train_s": round(log["train_s"], 1)}
    n = 8
    picks = _pick(torch.arange(len(data.test)), 3 * n, ctx.seed)
    rows = [torch.cat([test_in[picks[r * n: (r + 1) * n]], pred[picks[r * n: (r + 1) * n]],
                       data.test[picks[r * n: (r + 1) * n]]]) for r in range(3)]
    save_samples(torch.cat(rows), ctx.out_dir / "translations.png", ncols=n)  # outline / output / target rows
    return finish(ctx, {"generator": G, "discriminator": D, EXAMPLES: Examples(test_in)}, metrics, pred[:64],
                  {"translations": "translations.png"})


def sample_pix2pix(stage_dir: Path, n: int, seed: int, **options) -> torch.Tensor:
    """Return pix2pix's images (n, 3, S, S) in [-1, 1] from n held-out outlines picked with `seed`."""
    unconditional(options)
    cfg = load_config(stage_dir, Pix2PixConfig)
    G = _load(stage_dir, {"generator": UNet(cfg.channels, cfg.levels)})["generator"]
    return translate(G, _pick(load_state(stage_dir, EXAMPLES)["inputs"], n, seed)).clamp(-1, 1)


# ---------------------------------------------------------------- cyclegan


class ResnetGenerator(nn.Module):
    """CycleGAN generator: conv, one stride-2 conv, residual blocks, transposed conv, conv; InstanceNorm, tanh."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.InstanceNorm2d(c, affine=True)

        c2 = channels * 2
        self.head = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, padding_mode="reflect"), norm(channels),
                                  nn.ReLU(), nn.Conv2d(channels, c2, 4, stride=2, padding=1), norm(c2), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(c2, c2, 3, padding=1, padding_mode="reflect"), norm(c2),
                                                   nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1, padding_mode="reflect"),
                                                   norm(c2)) for _ in range(blocks)])
        self.tail = nn.Sequential(nn.ConvTranspose2d(c2, channels, 4, stride=2, padding=1), norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, 3, 3, padding=1, padding_mode="reflect"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        for block in self.blocks:
            h = h + block(h)
        return torch.tanh(self.tail(h))


def domain_classifier(a: torch.Tensor, b: torch.Tensor):
    """Return a logistic regression on pixels telling domain A (0) from B (1), fitted on the training domains."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([a, b]).flatten(1).numpy()
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    return LogisticRegression(max_iter=500).fit(x, y)


def run_cyclegan(ctx: StageContext) -> StageResult:
    """Train CycleGAN on unpaired digit domains; report cycle PSNR, translation PSNR and judge/domain accuracies."""
    cfg: CycleGANConfig = ctx.config
    torch.manual_seed(ctx.seed)
    data = load_data(ctx)
    dom_a, dom_b = unpaired_domains(data.train, data.train_labels, ctx.seed)
    G_ab, G_ba = ResnetGenerator(cfg.channels, cfg.blocks), ResnetGenerator(cfg.channels, cfg.blocks)
    D_a, D_b = PatchDiscriminator(3, cfg.d_channels), PatchDiscriminator(3, cfg.d_channels)
    modules = {k: m.to(cfg.device) for k, m in
               {"g_ab": G_ab, "g_ba": G_ba, "d_a": D_a, "d_b": D_b}.items()}
    opt_g = _adam(list(G_ab.parameters()) + list(G_ba.parameters()), cfg.lr, (cfg.beta1, 0.999))
    opt_d = _adam(list(D_a.parameters()) + list(D_b.parameters()), cfg.lr, (cfg.beta1, 0.999))
    gen = torch.Generator().manual_seed(ctx.seed)
    train_a, train_b = dom_a.to(cfg.device), dom_b.to(cfg.device)

    def step(i: int) -> dict[str, float]:
        a = train_a[batch_indices(len(train_a), cfg.batch_size, gen)]
        b = train_b[batch_indices(len(train_b), cfg.batch_size, gen)]
        fake_b, fake_a = G_ab(a), G_ba(b)
        adv = (D_b(fake_b) - 1).pow(2).mean() + (D_a(fake_a) - 1).pow(2).mean()  # least squares
        cycle = (G_ba(fake_b) - a).abs().mean() + (G_ab(fake_a) - b).abs().mean()
        identity = (G_ab(b) - b).abs().mean() + (G_ba(a) - a).abs().mean()
        loss_g = adv + cfg.cycle_weight * cycle + cfg.identity_weight * identity
        optimise(opt_g, loss_g)
        loss_d = 0.5 * ((D_b(b) - 1).pow(2).mean() + D_b(fake_b.detach()).pow(2).mean()
                        + (D_a(a) - 1).pow(2).mean() + D_a(fake_a.detach()).pow(2).mean())
        optimise(opt_d, loss_d)
        return {"adv": adv.item(), "cycle": cycle.item(), "identity": identity.item(), "loss_d": loss_d.item()}

    log = train_loop(ctx, "cyclegan", modules, {"g": opt_g, "d": opt_d}, cfg.steps, step, gen, cfg.checkpoint_every)
    modules = {k: m.cpu() for k, m in modules.items()}
    digits = data.test_labels < 10
    test_a, labels = data.test[digits], data.test_labels[digits]
    test_b = amber_style(test_a)  # the true counterparts: used for evaluation only
    to_b, to_a = translate(G_ab, test_a), translate(G_ba, test_b)
    back_a, back_b = translate(G_ba, to_b), translate(G_ab, to_a)
    classifier = domain_classifier(dom_a, dom_b)
    in_b = float((classifier.predict(to_b.flatten(1).numpy()) == 1).mean())
    in_a = float((classifier.predict(to_a.flatten(1).numpy()) == 0).mean())
    metrics = {
        "cycle_psnr_db": round((image_quality(back_a, test_a)["psnr_db"] + image_quality(back_b, test_b)["psnr_db"]) / 2, 3),
        "translation_psnr_db": round((image_quality(to_b, test_b)["psnr_db"]
                                      + image_quality(to_a, test_a)["psnr_db"]) / 2, 3),
        "baseline_identity_psnr_db": image_quality(test_a, test_b)["psnr_db"],
        "domain_accuracy": round((in_a + in_b) / 2, 4),
        "judge_accuracy_b2a": judge_images(data, to_a, labels)["accuracy"],
        "judge_accuracy_real": judge_images(data, test_a, labels)["accuracy"],
        **_history_columns(log["history"], "adv", "cycle", "identity"), "steps": cfg.steps,
        "train_s": round(log["train_s"], 1),
    }
    n = 8
    rows = [test_a[:n], to_b[:n], back_a[:n], test_b[n: 2 * n], to_a[n: 2 * n], back_b[n: 2 * n]]
    save_samples(torch.cat(rows), ctx.out_dir / "translations.png", ncols=n)  # a, G_ab(a), cycle; b, G_ba(b), cycle
    modules.update({"examples_a": Examples(test_a), "examples_b": Examples(test_b)})
    return finish(ctx, modules, metrics, torch.cat([to_b[:32], to_a[:32]]), {"translations": "translations.png"})


def sample_cyclegan(stage_dir: Path, n: int, seed: int, direction: str = "a2b", **options) -> torch.Tensor:
    """Return n translations (n, 3, S, S) in [-1, 1] of held-out digits picked with `seed`: a2b (white -> amber) or b2a."""
    if direction not in ("a2b", "b2a"):
        raise ValueError(f"direction must be a2b or b2a, not {direction!r}")
    unconditional(options)
    cfg = load_config(stage_dir, CycleGANConfig)
    net, source = ("g_ab", "examples_a") if direction == "a2b" else ("g_ba", "examples_b")
    G = _load(stage_dir, {net: ResnetGenerator(cfg.channels, cfg.blocks)})[net]
    return translate(G, _pick(load_state(stage_dir, source)["inputs"], n, seed)).clamp(-1, 1)
