"""3D Gaussian splatting (Kerbl et al. 2023) in readable PyTorch: the Gaussians, their projection, the rasterizer.

Why not the `gsplat` library: gsplat 1.5.3 (PyPI, a py3-none-any wheel) has no
CPU path. `gsplat.rasterization()` calls CUDA kernels that gsplat/cuda/_backend.py
JIT-compiles from gsplat/cuda/csrc with nvcc; its PyTorch reference
`gsplat.rendering._rasterization` still calls the CUDA wrapper
`rasterize_to_indices_in_range` and needs nerfacc, itself CUDA-only. Tried here
(gsplat 1.5.3 wheel, torch 2.13 CPU): `gsplat.rasterization` on CPU tensors tries the
JIT build, finds no CUDA runtime and raises ImportError (gsplat_cuda.so). So this file
does the same maths in PyTorch, with autograd for the backward pass, and keeps
gsplat's conventions where it can (quaternions w-first, log-scales, opacity
logits, SH coefficients (N, K, 3), the 0.3 px low-pass dilation, a 3σ footprint,
α ≤ 0.99 and α ≥ 1/255, depth-sorted lists per square tile).

A Gaussian i has a mean μ_i, a covariance Σ_i = R S Sᵀ Rᵀ (R from a unit
quaternion q_i, S = diag(exp(log_scale_i))), an opacity o_i = sigmoid(logit_i) and
a colour from spherical harmonics of the viewing direction (degree ≤ 3):
c_i(d) = max(0, Σ_lm k_lm,i Y_lm(d) + 0.5).

Projection (EWA splatting): in the camera frame (OpenCV axes: x right, y down,
z forward) t = W μ + w, the pixel mean is (f t_x/t_z + c_x, f t_y/t_z + c_y) and
the 2-D covariance Σ' = J W Σ Wᵀ Jᵀ + 0.3 I with J = ∂(pixel)/∂t the Jacobian of
the perspective projection at t.

Rasterization: the image is cut into tiles; each Gaussian is listed in every
tile its 3σ box touches; within a tile its Gaussians are sorted front to back by
depth and composited per pixel p:
α_i(p) = min(0.99, o_i exp(−½ (p − μ'_i)ᵀ Σ'_i⁻¹ (p − μ'_i))),
T_i = Π_{j<i} (1 − α_j), colour(p) = Σ_i T_i α_i c_i + T_final · background.
One tensor (tiles, K, pixels per tile) holds every tile at once, K = the most
Gaussians any tile has (shorter lists padded with α = 0): no per-pixel early
stop (CUDA kernels stop at T < 1e-4; here T is multiplied through).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "gaussians.safetensors"
CONFIG_FILE = "gaussians.json"
FIELDS = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")

# Real spherical-harmonic constants (as the 3DGS reference code and gsplat), per degree.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)
LOW_PASS = 0.3  # px² added to every 2-D covariance (anti-aliasing, keeps tiny Gaussians ≥ ~1 px)
MIN_DEPTH = 0.2  # Gaussians nearer than this (camera z) are not drawn
ALPHA_MAX, ALPHA_MIN = 0.99, 1.0 / 255.0


def rgb_to_sh(rgb: torch.Tensor) -> torch.Tensor:
    """Return the degree-0 coefficient whose colour is `rgb` (inverse of c = C0·k + 0.5)."""
    return (rgb - 0.5) / SH_C0


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Return the real SH basis Y_lm(d) (..., (degree+1)²) of unit directions `dirs` (..., 3)."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * xz, SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * xy * z, SH_C3[2] * y * (4 * zz - xx - yy),
                SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def sh_colour(coeffs: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Return colours (N, 3) ≥ 0 of SH coefficients (N, K, 3) seen along unit directions (N, 3)."""
    basis = sh_basis(dirs, degree)  # (N, (degree+1)²)
    return ((basis[..., None] * coeffs[:, : basis.shape[-1]]).sum(-2) + 0.5).clamp(min=0.0)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Return rotation matrices (N, 3, 3) of quaternions (N, 4) (w, x, y, z; normalised here)."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def covariances(log_scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """Return the 3-D covariances Σ = R S Sᵀ Rᵀ (N, 3, 3)."""
    m = quat_to_rotmat(quats) * log_scales.exp()[:, None, :]  # R S: column k scaled by s_k
    return m @ m.transpose(1, 2)


def gl_to_view(c2w: torch.Tensor) -> torch.Tensor:
    """Return the 4×4 world-to-camera matrix in OpenCV axes of an OpenGL camera-to-world pose (nerf_data's)."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype))
    return flip @ torch.linalg.inv(c2w)


def project(means: torch.Tensor, covs: torch.Tensor, viewmat: torch.Tensor, focal: float, cx: float,
            cy: float) -> dict[str, torch.Tensor]:
    """Return the screen-space Gaussians: means2d (N, 2) px, conics (N, 3) = (a, b, c) of Σ'⁻¹, depths (N,),
    radii (N,) px of the 3σ footprint (0 where not drawn) and the covariances cov2d (N, 2, 2)."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    t = means @ rot.T + trans  # (N, 3) camera frame
    depth = t[:, 2]
    z = depth.clamp(min=MIN_DEPTH)
    # J = ∂(u, v)/∂t of u = f x/z + cx, v = f y/z + cy
    zeros = torch.zeros_like(z)
    jac = torch.stack([focal / z, zeros, -focal * t[:, 0] / z ** 2,
                       zeros, focal / z, -focal * t[:, 1] / z ** 2], -1).reshape(-1, 2, 3)
    jw = jac @ rot  # (N, 2, 3)
    cov2d = jw @ covs @ jw.transpose(1, 2) + LOW_PASS * torch.eye(2, dtype=means.dtype)
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det = a * c - b * b
    conics = torch.stack([c / det, -b / det, a / det], -1)
    mid = 0.5 * (a + c)
    lam_max = mid + torch.sqrt((mid * mid - det).clamp(min=0.1))
    radii = torch.ceil(3.0 * torch.sqrt(lam_max)).detach()
    radii = torch.where(depth > MIN_DEPTH, radii, torch.zeros_like(radii))
    means2d = torch.stack([focal * t[:, 0] / z + cx, focal * t[:, 1] / z + cy], -1)
    return {"means2d": means2d, "conics": conics, "depths": depth, "radii": radii, "cov2d": cov2d}


def tile_lists(means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, height: int, width: int,
               tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return, per tile (row-major), its Gaussians front to back: ids (T, K) and a validity mask (T, K).

    Gaussian i is listed in every tile its box [μ' ± radius] touches; K is the
    longest list (at least 1).
    """
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    with torch.no_grad():
        m, r = means2d.detach(), radii
        x0 = torch.floor((m[:, 0] - r) / tile).clamp(0, tiles_x).long()
        x1 = torch.floor((m[:, 0] + r) / tile).clamp(-1, tiles_x - 1).long()
        y0 = torch.floor((m[:, 1] - r) / tile).clamp(0, tiles_y).long()
        y1 = torch.floor((m[:, 1] + r) / tile).clamp(-1, tiles_y - 1).long()
        nx, ny = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
        count = torch.where(r > 0, nx * ny, torch.zeros_like(nx))  # tiles per Gaussian
        gid = torch.repeat_interleave(torch.arange(len(r)), count)  # (pairs,)
        first = torch.cumsum(count, 0) - count
        local = torch.arange(len(gid)) - first[gid]  # index of the pair within its Gaussian's box
        tx, ty = x0[gid] + local % nx[gid], y0[gid] + local // nx.clamp(min=1)[gid]
        tid = ty * tiles_x + tx
        depth_rank = torch.empty(len(r), dtype=torch.long)
        depth_rank[torch.argsort(depths.detach(), stable=True)] = torch.arange(len(r))
        order = torch.argsort(tid * len(r) + depth_rank[gid], stable=True)
        gid, tid = gid[order], tid[order]
        per_tile = torch.bincount(tid, minlength=tiles_x * tiles_y)
        start = torch.cumsum(per_tile, 0) - per_tile
        slot = torch.arange(len(gid)) - start[tid]
        k = max(int(per_tile.max()) if len(gid) else 0, 1)
        ids = torch.zeros(tiles_x * tiles_y, k, dtype=torch.long)
        mask = torch.zeros(tiles_x * tiles_y, k, dtype=torch.bool)
        ids[tid, slot] = gid
        mask[tid, slot] = True
    return ids, mask


def rasterize(means2d: torch.Tensor, conics: torch.Tensor, colours: torch.Tensor, opacities: torch.Tensor,
              depths: torch.Tensor, radii: torch.Tensor, height: int, width: int, background: torch.Tensor,
              tile: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the image (H, W, C) alpha-composited front to back, and its accumulated opacity (H, W)."""
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    ids, mask = tile_lists(means2d, radii, depths, height, width, tile)  # (T, K)
    # pixel centres of each tile (T, P, 2), P = tile²; pixels past the image edge are cropped below
    py, px = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij")
    ty, tx = torch.meshgrid(torch.arange(tiles_y), torch.arange(tiles_x), indexing="ij")
    pix_x = (tx.reshape(-1, 1) * tile + px.reshape(1, -1)).to(means2d.dtype) + 0.5
    pix_y = (ty.reshape(-1, 1) * tile + py.reshape(1, -1)).to(means2d.dtype) + 0.5
    dx = pix_x[:, None, :] - means2d[ids, 0][:, :, None]  # (T, K, P)
    dy = pix_y[:, None, :] - means2d[ids, 1][:, :, None]
    a, b, c = conics[ids, 0][..., None], conics[ids, 1][..., None], conics[ids, 2][..., None]
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    alpha = (opacities[ids][..., None] * power.exp()).clamp(max=ALPHA_MAX)
    alpha = torch.where(mask[..., None] & (power <= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], 1), 1)  # (T, K+1, P)
    weights = alpha * trans[:, :-1]  # (T, K, P)
    image = torch.einsum("tkp,tkc->tpc", weights, colours[ids]) + trans[:, -1, :, None] * background
    acc = weights.sum(1)
    # (T, P, C) → (H, W, C)
    image = image.reshape(tiles_y, tiles_x, tile, tile, -1).permute(0, 2, 1, 3, 4)
    image = image.reshape(tiles_y * tile, tiles_x * tile, -1)[:height, :width]
    acc = acc.reshape(tiles_y, tiles_x, tile, tile).permute(0, 2, 1, 3).reshape(tiles_y * tile, tiles_x * tile)
    return image, acc[:height, :width]


class GaussianCloud(nn.Module):
    """N anisotropic 3-D Gaussians: means, log-scales, quaternions, opacity logits, SH colour coefficients."""

    def __init__(self, n: int, sh_degree: int):
        super().__init__()
        self.sh_degree = sh_degree
        k = (sh_degree + 1) ** 2
        self.means = nn.Parameter(torch.zeros(n, 3))
        self.log_scales = nn.Parameter(torch.zeros(n, 3))
        self.quats = nn.Parameter(torch.zeros(n, 4))
        self.opacity_logits = nn.Parameter(torch.zeros(n))
        self.sh_dc = nn.Parameter(torch.zeros(n, 1, 3))
        self.sh_rest = nn.Parameter(torch.zeros(n, k - 1, 3))

    def __len__(self) -> int:
        return self.means.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the parameters by field name."""
        return {f: getattr(self, f) for f in FIELDS}

    def set_tensors(self, values: dict[str, torch.Tensor]) -> None:
        """Replace every parameter with a new one holding `values[field]` (the count may change)."""
        for f in FIELDS:
            setattr(self, f, nn.Parameter(values[f].detach().clone()))


def render(cloud: GaussianCloud, c2w: torch.Tensor, height: int, width: int, focal: float,
           background: float, tile: int = 16) -> dict[str, torch.Tensor]:
    """Return the render of `cloud` from OpenGL pose `c2w`: image (H, W, 3), alpha (H, W) and the
    screen-space quantities of project() (means2d keeps its gradient for densification)."""
    viewmat = gl_to_view(c2w.to(cloud.means.dtype))
    screen = project(cloud.means, covariances(cloud.log_scales, cloud.quats), viewmat, focal, width / 2, height / 2)
    camera = c2w[:3, 3].to(cloud.means.dtype)
    dirs = cloud.means - camera
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    colours = sh_colour(torch.cat([cloud.sh_dc, cloud.sh_rest], 1), dirs, cloud.sh_degree)
    if screen["means2d"].requires_grad:
        screen["means2d"].retain_grad()
    bg = torch.full((3,), background, dtype=cloud.means.dtype)
    image, alpha = rasterize(screen["means2d"], screen["conics"], colours, torch.sigmoid(cloud.opacity_logits),
                             screen["depths"], screen["radii"], height, width, bg, tile)
    return {"image": image, "alpha": alpha, **screen}


def save_cloud(out_dir: Path, cloud: GaussianCloud, meta: dict) -> None:
    """Write the Gaussians (safetensors) and the render settings (JSON) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({f: t.detach().cpu().contiguous() for f, t in cloud.tensors().items()}, out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps({"sh_degree": cloud.sh_degree, "gaussians": len(cloud),
                                                   **meta}, indent=1) + "\n")


def load_cloud(directory: Path) -> tuple[GaussianCloud, dict]:
    """Return the Gaussians saved by save_cloud and their render settings."""
    meta = json.loads((directory / CONFIG_FILE).read_text())
    cloud = GaussianCloud(meta["gaussians"], meta["sh_degree"])
    cloud.set_tensors(load_file(directory / WEIGHTS_FILE))
    return cloud, meta
