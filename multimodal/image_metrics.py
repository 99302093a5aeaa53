"""Image quality against a reference: PSNR and SSIM (Wang et al. 2004, Gaussian window)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Return the peak signal-to-noise ratio in dB of images in [0, 1] (any equal shapes)."""
    mse = float((pred - target).pow(2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Return a normalised 2-D Gaussian window (size, size)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Return the mean SSIM of images (H, W, C) in [0, 1]: per-channel local statistics, valid windows only."""
    win = gaussian_window(size, sigma).to(pred.device)[None, None]  # (1, 1, k, k)
    x = pred.permute(2, 0, 1)[:, None].double()  # (C, 1, H, W)
    y = target.permute(2, 0, 1)[:, None].double()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    var_x = F.conv2d(x * x, win) - mu_x ** 2
    var_y = F.conv2d(y * y, win) - mu_y ** 2
    cov = F.conv2d(x * y, win) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.mean())
