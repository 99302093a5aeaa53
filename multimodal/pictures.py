"""Pictures the multimodal stages write: image grids, line plots and GIFs (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

PLOT_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Return float images in [0, 1] as uint8 (clipped), same shape."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Return one PIL image tiling `images` (N, H, W, 3) floats in [0, 1], `ncols` per row.

    Each tile is enlarged `scale` times (nearest neighbour) and framed by `pad` grey pixels.
    """
    n, h, w, _ = images.shape
    nrows = -(-n // ncols)
    th, tw = h * scale + pad, w * scale + pad
    canvas = np.full((nrows * th + pad, ncols * tw + pad, 3), 96, dtype=np.uint8)
    tiles = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H*s, W*s, 3)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        canvas[pad + r * th: pad + r * th + h * scale, pad + c * tw: pad + c * tw + w * scale] = tile
    return Image.fromarray(canvas)


def save_grid(images: np.ndarray, path: Path, ncols: int, scale: int = 1, row_labels: Sequence[str] = ()) -> Path:
    """Write `images` (N, H, W, 3) in [0, 1] as a PNG grid, with an optional label left of each row; return path."""
    grid = image_grid(images, ncols, scale)
    if row_labels:
        h = images.shape[1] * scale + 1
        label_w = 8 + 6 * max(len(s) for s in row_labels)
        framed = Image.new("RGB", (grid.width + label_w, grid.height), (255, 255, 255))
        framed.paste(grid, (label_w, 0))
        draw = ImageDraw.Draw(framed)
        for r, text in enumerate(row_labels):
            draw.text((4, 1 + r * h + max(0, h // 2 - 6)), text, fill=(0, 0, 0))
        grid = framed
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_line_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    path: Path,
    title: str,
    xlabel: str,
    size: tuple[int, int] = (480, 320),
) -> Path:
    """Write a PNG line plot of named (x, y) series with min/max axis labels; return path."""
    width, height = size
    left, right, top, bottom = 56, 12, 24, 36
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1.0
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1.0

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    draw.text((left, height - bottom + 4), f"{x0:.4g}", fill=(0, 0, 0))
    draw.text((width - right - 40, height - bottom + 4), f"{x1:.4g}", fill=(0, 0, 0))
    draw.text(((width - len(xlabel) * 6) // 2, height - 16), xlabel, fill=(0, 0, 0))
    draw.text((2, top), f"{y1:.4g}", fill=(0, 0, 0))
    draw.text((2, height - bottom - 10), f"{y0:.4g}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        if len(pts) > 1:
            draw.line([px(x, y) for x, y in pts], fill=colour, width=2)
        elif pts:
            cx, cy = px(*pts[0])
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.text((width - right - 8 - 6 * len(name), top + 4 + 12 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_gif(frames: np.ndarray, path: Path, scale: int = 1, frame_ms: int = 80) -> Path:
    """Write frames (N, H, W, 3) in [0, 1] as a looping GIF; return path."""
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in to_uint8(frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path
