"""The `nerf_data` stage: a procedurally ray-traced scene photographed from many known poses.

Scene (z up): four coloured spheres on a low-contrast checkered floor disc,
lit by a directional light with hard shadows, Lambert diffuse plus a Phong
highlight on the spheres (view-dependent colour), white background. Cameras sit
on a sphere of radius `radius` around the scene, looking at its centre, at
azimuths round the circle and elevations 15°–55°; every (views/test_views)-th
pose is held out. Output follows the Blender NeRF-synthetic layout that NeRF
tools read: transforms_{train,test}.json (camera_angle_x, 4×4 camera-to-world
matrices, OpenGL camera axes: x right, y up, looking down −z) + PNGs, with the
ray bounds as extra keys `near`/`far`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multimodal.figures import print_figures
from multimodal.pictures import save_grid, to_uint8
from pipeline.stage import StageContext, StageResult

SPHERES = (  # centre (x, y, z), radius, albedo
    ((0.50, 0.30, 0.45), 0.45, (0.85, 0.15, 0.12)),
    ((-0.55, 0.45, 0.35), 0.35, (0.15, 0.70, 0.20)),
    ((-0.10, -0.65, 0.30), 0.30, (0.15, 0.25, 0.90)),
    ((0.65, -0.55, 0.20), 0.20, (0.95, 0.80, 0.10)),
)
FLOOR_RADIUS = 2.0
LIGHT = (0.4, 0.3, 1.0)
TARGET = (0.0, 0.0, 0.3)
BACKGROUND = 1.0  # white
NEAR, FAR = 1.5, 6.5  # ray bounds for cameras at radius ≤ 4.5 (every surface lies within 2.0 of the origin)


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Return the 4×4 camera-to-world matrix of a camera at `eye` looking at `target` (OpenGL axes)."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    true_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -forward, eye
    return c2w


def orbit_pose(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """Return the camera-to-world matrix of a camera on the orbit around the scene centre."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = np.array(TARGET) + radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    return look_at(eye, np.array(TARGET))


def ring_poses(views: int, radius: float) -> np.ndarray:
    """Return (views, 4, 4) poses: azimuths evenly round, elevations spread over 15°–55° (golden ratio)."""
    golden = (math.sqrt(5) - 1) / 2
    return np.stack([orbit_pose(360.0 * k / views, 15.0 + 40.0 * ((k * golden) % 1.0), radius) for k in range(views)])


def focal_length(image_size: int, fov_deg: float) -> float:
    """Return the focal length in pixels of a square image with horizontal field of view `fov_deg`."""
    return 0.5 * image_size / math.tan(0.5 * math.radians(fov_deg))


def camera_rays(c2w: torch.Tensor, height: int, width: int, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ray origins and unit directions (H, W, 3) through pixel centres of a pinhole camera."""
    j, i = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    dirs = torch.stack([(i + 0.5 - width / 2) / focal, -(j + 0.5 - height / 2) / focal, -torch.ones_like(i)], -1)
    world = dirs @ c2w[:3, :3].T  # (H, W, 3)
    world = world / world.norm(dim=-1, keepdim=True)
    return c2w[:3, 3].expand_as(world), world


def _sphere_hits(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Return the distance (R, n_spheres) to each sphere along each ray (inf where missed)."""
    hits = []
    for centre, radius, _ in SPHERES:
        oc = origins - torch.tensor(centre)
        b = (oc * dirs).sum(-1)
        disc = b * b - ((oc * oc).sum(-1) - radius * radius)
        t = -b - torch.sqrt(disc.clamp(min=0))
        hits.append(torch.where((disc > 0) & (t > 1e-4), t, torch.full_like(t, math.inf)))
    return torch.stack(hits, -1)


def trace(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Return the colour (R, 3) seen along rays (R, 3): first hit shaded, with shadows; white where missed."""
    light = F.normalize(torch.tensor(LIGHT), dim=0)
    sphere_t = _sphere_hits(origins, dirs)  # (R, S)
    t_sphere, which = sphere_t.min(-1)
    t_floor = torch.where(dirs[:, 2] < 0, -origins[:, 2] / dirs[:, 2].clamp(max=-1e-8), torch.full_like(t_sphere, math.inf))
    floor_pt = origins + t_floor[:, None] * dirs
    t_floor = torch.where(floor_pt[:, :2].norm(dim=-1) <= FLOOR_RADIUS, t_floor, torch.full_like(t_floor, math.inf))
    hit_sphere = t_sphere < t_floor
    t = torch.minimum(t_sphere, t_floor)
    missed = torch.isinf(t)
    t = torch.where(missed, torch.zeros_like(t), t)
    points = origins + t[:, None] * dirs

    centres = torch.tensor([s[0] for s in SPHERES])
    radii = torch.tensor([s[1] for s in SPHERES])
    albedos = torch.tensor([s[2] for s in SPHERES])
    normal = torch.where(hit_sphere[:, None], (points - centres[which]) / radii[which, None],
                         torch.tensor([0.0, 0.0, 1.0]).expand_as(points))
    checker = ((torch.floor(points[:, 0] / 0.5) + torch.floor(points[:, 1] / 0.5)) % 2)[:, None]
    floor_albedo = 0.68 + 0.14 * checker * torch.ones(1, 3)
    albedo = torch.where(hit_sphere[:, None], albedos[which], floor_albedo)

    shadow_t = _sphere_hits(points + 1e-3 * normal, light.expand_as(points))
    lit = torch.isinf(shadow_t.min(-1).values).float()
    diffuse = (normal @ light).clamp(min=0) * lit
    reflected = 2 * (normal @ light)[:, None] * normal - light
    specular = ((reflected * -dirs).sum(-1).clamp(min=0) ** 32) * lit * hit_sphere.float()
    colour = albedo * (0.3 + 0.7 * diffuse[:, None]) + 0.35 * specular[:, None]
    return torch.where(missed[:, None], torch.full_like(colour, BACKGROUND), colour.clamp(0, 1))


def render_view(c2w: np.ndarray, image_size: int, focal: float, supersample: int) -> np.ndarray:
    """Return the ray-traced image (S, S, 3) in [0, 1], box-filtered from `supersample`² rays per pixel."""
    big = image_size * supersample
    origins, dirs = camera_rays(torch.tensor(c2w, dtype=torch.float32), big, big, focal * supersample)
    colour = trace(origins.reshape(-1, 3), dirs.reshape(-1, 3)).reshape(1, big, big, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(colour, supersample)[0].permute(1, 2, 0).numpy()


def write_split(out_dir: Path, split: str, images: list[np.ndarray], poses: list[np.ndarray], fov_deg: float,
                image_size: int, focal: float) -> None:
    """Write <split>/r_<k>.png and transforms_<split>.json (Blender NeRF-synthetic format)."""
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    frames = []
    for k, (img, pose) in enumerate(zip(images, poses)):
        Image.fromarray(to_uint8(img)).save(out_dir / split / f"r_{k}.png")
        frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": pose.tolist()})
    meta = {"camera_angle_x": math.radians(fov_deg), "w": image_size, "h": image_size, "fl_x": focal,
            "fl_y": focal, "cx": image_size / 2, "cy": image_size / 2, "near": NEAR, "far": FAR, "frames": frames}
    (out_dir / f"transforms_{split}.json").write_text(json.dumps(meta, indent=1) + "\n")


def read_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return images (V, H, W, 3) float in [0, 1], poses (V, 4, 4) and the metadata of one split."""
    meta = json.loads((data_dir / f"transforms_{split}.json").read_text())
    images = np.stack([np.asarray(Image.open(data_dir / (f["file_path"] + ".png")).convert("RGB"), dtype=np.float32)
                       / 255.0 for f in meta["frames"]])
    poses = np.array([f["transform_matrix"] for f in meta["frames"]], dtype=np.float32)
    return images, poses, meta


def run(ctx: StageContext) -> StageResult:
    """Render every pose, write the train/test splits and a preview; return view counts."""
    cfg = ctx.config
    focal = focal_length(cfg.image_size, cfg.fov_deg)
    poses = ring_poses(cfg.views, cfg.radius)
    images = [render_view(p, cfg.image_size, focal, cfg.supersample) for p in poses]
    every = max(1, cfg.views // max(1, cfg.test_views))
    test = [k for k in range(cfg.views) if k % every == every // 2][: cfg.test_views]
    train = [k for k in range(cfg.views) if k not in test]
    for split, keys in (("train", train), ("test", test)):
        write_split(ctx.out_dir, split, [images[k] for k in keys], [poses[k] for k in keys], cfg.fov_deg,
                    cfg.image_size, focal)
    save_grid(np.stack(images[:16]), ctx.out_dir / "preview.png", ncols=8, scale=2)
    metrics = {"train_views": len(train), "test_views": len(test), "image_size": cfg.image_size,
               "focal_px": round(focal, 3), "near": NEAR, "far": FAR}
    print_figures("nerf_data: ray-traced views", metrics)
    return StageResult(
        outputs={"train": "transforms_train.json", "test": "transforms_test.json", "train_images": "train",
                 "test_images": "test", "preview": "preview.png"},
        metrics=metrics,
    )
