"""NeRF in pure PyTorch: positional encoding, the MLP field, stratified and importance
(hierarchical) sampling along rays, and volume rendering.

Rendering a ray r(t) = o + t·d with samples t_1 < … < t_n in [near, far]:
δ_i = t_{i+1} − t_i (δ_n = far − t_n), α_i = 1 − exp(−σ_i δ_i),
T_i = Π_{j<i} (1 − α_j), w_i = T_i α_i, colour = Σ w_i c_i + (1 − Σ w_i)·background.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "nerf.safetensors"
CONFIG_FILE = "nerf.json"


def positional_encoding(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Return [x, sin(2^k π x), cos(2^k π x) for k < n_freqs] (..., D·(1 + 2·n_freqs))."""
    freqs = (2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)) * torch.pi  # (F,)
    angles = x[..., None, :] * freqs[:, None]  # (..., F, D)
    return torch.cat([x, angles.sin().flatten(-2), angles.cos().flatten(-2)], -1)


class NerfField(nn.Module):
    """MLP (position → density, feature; feature + view direction → colour), positions scaled to |x| ≲ 1."""

    def __init__(self, pos_freqs: int, dir_freqs: int, width: int, depth: int, scene_scale: float):
        super().__init__()
        self.config = {"pos_freqs": pos_freqs, "dir_freqs": dir_freqs, "width": width, "depth": depth,
                       "scene_scale": scene_scale}
        pos_dim, dir_dim = 3 * (1 + 2 * pos_freqs), 3 * (1 + 2 * dir_freqs)
        layers = [nn.Linear(pos_dim, width)] + [nn.Linear(width, width) for _ in range(depth - 1)]
        self.trunk = nn.ModuleList(layers)
        self.density = nn.Linear(width, 1)
        self.feature = nn.Linear(width, width)
        self.colour = nn.Sequential(nn.Linear(width + dir_dim, width // 2), nn.ReLU(), nn.Linear(width // 2, 3))

    def forward(self, points: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return density σ ≥ 0 (...,) and colour in [0, 1] (..., 3) at points (..., 3) seen along dirs (..., 3)."""
        h = positional_encoding(points / self.config["scene_scale"], self.config["pos_freqs"])
        for layer in self.trunk:
            h = F.relu(layer(h))
        sigma = F.softplus(self.density(h)[..., 0] - 1.0)
        view = positional_encoding(dirs, self.config["dir_freqs"])
        rgb = torch.sigmoid(self.colour(torch.cat([self.feature(h), view], -1)))
        return sigma, rgb


def stratified_samples(near: float, far: float, n: int, rays: int, perturb: bool,
                       generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Return sample distances (rays, n): one per equal bin of [near, far], uniform in it if perturb else its centre."""
    edges = torch.linspace(near, far, n + 1, device=device)
    u = torch.rand(rays, n, generator=generator).to(device) if perturb else torch.full((rays, n), 0.5, device=device)
    return edges[:-1] + (edges[1:] - edges[:-1]) * u


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n: int, perturb: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Return n distances per ray (R, n) drawn by inverse-CDF from piecewise-constant weights (R, B) on bins (R, B+1)."""
    pdf = (weights + 1e-5) / (weights + 1e-5).sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1)  # (R, B+1)
    if perturb:
        u = torch.rand(weights.shape[0], n, generator=generator).to(weights.device)
    else:
        u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, device=weights.device).expand(weights.shape[0], n)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, cdf.shape[-1] - 1)  # (R, n)
    c0, c1 = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    b0, b1 = bins.gather(-1, idx - 1), bins.gather(-1, idx)
    frac = (u - c0) / (c1 - c0).clamp(min=1e-8)
    return b0 + frac * (b1 - b0)


def volume_render(sigma: torch.Tensor, rgb: torch.Tensor, t: torch.Tensor, far: float,
                  background: float) -> dict[str, torch.Tensor]:
    """Return colour (R, 3), weights (R, S), opacity (R,), depth (R,) of samples σ (R, S), c (R, S, 3) at sorted t (R, S)."""
    deltas = torch.cat([t[:, 1:] - t[:, :-1], (far - t[:, -1:]).clamp(min=0)], -1)  # (R, S)
    alpha = 1.0 - torch.exp(-sigma * deltas)
    trans = torch.exp(-torch.cat([torch.zeros_like(sigma[:, :1]), (sigma * deltas)[:, :-1]], -1).cumsum(-1))  # T_i
    weights = trans * alpha
    opacity = weights.sum(-1)
    colour = (weights[..., None] * rgb).sum(-2) + (1.0 - opacity[:, None]) * background
    depth = (weights * t).sum(-1)
    return {"colour": colour, "weights": weights, "opacity": opacity, "depth": depth}


def render_rays(coarse: NerfField, fine: NerfField, origins: torch.Tensor, dirs: torch.Tensor, near: float,
                far: float, n_coarse: int, n_fine: int, perturb: bool, background: float,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Return coarse and fine colours (R, 3) of rays (R, 3): coarse samples, then importance samples on them."""
    r = origins.shape[0]
    t_c = stratified_samples(near, far, n_coarse, r, perturb, generator, origins.device)  # (R, Nc)
    pts = origins[:, None] + t_c[..., None] * dirs[:, None]  # (R, Nc, 3)
    sigma, rgb = coarse(pts, dirs[:, None].expand_as(pts))
    out_c = volume_render(sigma, rgb, t_c, far, background)
    mids = torch.cat([torch.full_like(t_c[:, :1], near), (t_c[:, 1:] + t_c[:, :-1]) / 2,
                      torch.full_like(t_c[:, :1], far)], -1)  # (R, Nc+1) bins around the coarse samples
    t_f = sample_pdf(mids, out_c["weights"].detach(), n_fine, perturb, generator)
    t_all, _ = torch.sort(torch.cat([t_c, t_f], -1), -1)  # (R, Nc+Nf)
    pts = origins[:, None] + t_all[..., None] * dirs[:, None]
    sigma, rgb = fine(pts, dirs[:, None].expand_as(pts))
    out_f = volume_render(sigma, rgb, t_all, far, background)
    return {"coarse": out_c["colour"], "fine": out_f["colour"], "depth": out_f["depth"], "opacity": out_f["opacity"]}


@torch.no_grad()
def render_image(coarse: NerfField, fine: NerfField, origins: torch.Tensor, dirs: torch.Tensor, near: float,
                 far: float, n_coarse: int, n_fine: int, background: float, chunk: int = 4096) -> torch.Tensor:
    """Return the fine colour (H, W, 3) of a camera's rays (H, W, 3), rendered deterministically in chunks."""
    shape = origins.shape
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    out = [render_rays(coarse, fine, o[s: s + chunk], d[s: s + chunk], near, far, n_coarse, n_fine, False,
                       background)["fine"] for s in range(0, o.shape[0], chunk)]
    return torch.cat(out).reshape(shape).clamp(0, 1)


def save_nerf(out_dir: Path, coarse: NerfField, fine: NerfField, render: dict) -> None:
    """Write nerf.safetensors (coarse.* and fine.* weights) and nerf.json (field config + render settings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
               for name, field in (("coarse", coarse), ("fine", fine)) for k, v in field.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps({"field": fine.config, "render": render}, indent=2) + "\n")


def load_nerf(directory: Path, device: str = "cpu") -> tuple[NerfField, NerfField, dict]:
    """Return the coarse and fine fields (eval mode) and the render settings written by `save_nerf`."""
    meta = json.loads((directory / CONFIG_FILE).read_text())
    tensors = load_file(str(directory / WEIGHTS_FILE))
    fields = []
    for name in ("coarse", "fine"):
        field = NerfField(**meta["field"])
        field.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        fields.append(field.to(device).eval())
    return fields[0], fields[1], meta["render"]
