"""The `t2i_data` stage: an offline image–caption set (sklearn digits + drawn coloured shapes).

Digits: scikit-learn's 1,797 8×8 handwritten digits, upscaled (bilinear) to
`image_size`, white on black, captioned "a handwritten seven" plus a stroke
word from the ink mass within its class ("…, thick strokes" for the heaviest
third, "…, thin strokes" for the lightest). Shapes: circles, squares and
triangles in four colours drawn with Pillow at 4× and downsampled, jittered in
place and size, captioned "a red circle" (with "small"/"large" for the size
extremes). Every image has a class (10 digits + colour×shape) used by the
quality judge; the set is deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from multimodal.figures import print_figures
from multimodal.pictures import save_grid
from pipeline.stage import StageContext, StageResult

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DATASET_FILE = "dataset.safetensors"
CAPTIONS_FILE = "captions.jsonl"
CLASSES_FILE = "classes.json"


def class_prompts() -> list[str]:
    """Return the base prompt of every class, indexed by class id (digits 0–9, then colour×shape)."""
    digits = [f"a handwritten {w}" for w in DIGIT_WORDS]
    shapes = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    return digits + shapes


def digit_images(image_size: int, style_words: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return sklearn's digits as (N, 3, S, S) uint8, their labels (N,) and captions."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    big = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255 + 0.5).to(torch.uint8).repeat(1, 3, 1, 1).numpy()  # (N, 3, S, S)
    labels = digits.target.astype(np.int64)
    ink = digits.images.reshape(len(labels), -1).sum(axis=1)
    terciles = {c: np.quantile(ink[labels == c], [1 / 3, 2 / 3]) for c in range(len(DIGIT_WORDS))}
    captions = []
    for i, label in enumerate(labels):
        caption = f"a handwritten {DIGIT_WORDS[label]}"
        if style_words:
            lo, hi = terciles[label]
            if ink[i] >= hi:
                caption += ", thick strokes"
            elif ink[i] <= lo:
                caption += ", thin strokes"
        captions.append(caption)
    return images, labels, captions


def draw_shape(shape: str, colour: tuple[int, int, int], image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Return one shape drawn on black as (3, S, S) uint8 and its relative radius."""
    hi = image_size * 4
    radius = rng.uniform(0.22, 0.40)
    cx, cy = (0.5 + rng.uniform(-0.1, 0.1, size=2)) * hi
    r = radius * hi
    jitter = rng.integers(-20, 21, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    img = Image.new("RGB", (hi, hi), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        side = r * 0.85
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.7), (cx + r * 0.95, cy + r * 0.7)], fill=fill)
    small = img.resize((image_size, image_size), Image.LANCZOS)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1), radius


def shape_images(image_size: int, per_kind: int, style_words: bool, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return `per_kind` drawn images of every colour×shape as (N, 3, S, S) uint8, labels and captions."""
    rng = np.random.default_rng(seed)
    images, labels, captions = [], [], []
    for k, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        for _ in range(per_kind):
            img, radius = draw_shape(shape, COLOURS[colour], image_size, rng)
            size_word = ("small " if radius < 0.27 else "large " if radius > 0.35 else "") if style_words else ""
            images.append(img)
            labels.append(len(DIGIT_WORDS) + k)
            captions.append(f"a {size_word}{colour} {shape}")
    return np.stack(images), np.array(labels, dtype=np.int64), captions


def build_caption_set(image_size: int, shapes_per_kind: int, test_fraction: float, style_words: bool, seed: int) -> dict:
    """Return {images (N,3,S,S) uint8, labels (N,), split (N,) 0=train 1=test, captions [N]}."""
    d_img, d_lab, d_cap = digit_images(image_size, style_words)
    s_img, s_lab, s_cap = shape_images(image_size, shapes_per_kind, style_words, seed)
    images = np.concatenate([d_img, s_img])
    labels = np.concatenate([d_lab, s_lab])
    rng = np.random.default_rng(seed + 1)
    split = (rng.random(len(labels)) < test_fraction).astype(np.uint8)
    return {"images": images, "labels": labels, "split": split, "captions": d_cap + s_cap}


def write_caption_set(data: dict, out_dir: Path) -> None:
    """Write the set as dataset.safetensors + captions.jsonl + classes.json under out_dir."""
    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in ("images", "labels", "split")},
        str(out_dir / DATASET_FILE),
    )
    with open(out_dir / CAPTIONS_FILE, "w") as f:
        for i, caption in enumerate(data["captions"]):
            f.write(json.dumps({"index": i, "caption": caption, "label": int(data["labels"][i]),
                                "split": "test" if data["split"][i] else "train"}) + "\n")
    (out_dir / CLASSES_FILE).write_text(json.dumps({"prompts": class_prompts()}, indent=2) + "\n")


def read_caption_set(data_dir: Path) -> dict:
    """Return the set written by `write_caption_set` (numpy arrays + captions list)."""
    tensors = load_file(str(data_dir / DATASET_FILE))
    with open(data_dir / CAPTIONS_FILE) as f:
        captions = [json.loads(line)["caption"] for line in f]
    data = {k: v.numpy() for k, v in tensors.items()}
    data["captions"] = captions
    return data


def run(ctx: StageContext) -> StageResult:
    """Build and write the caption set and a preview grid; return its outputs and counts."""
    cfg = ctx.config
    data = build_caption_set(cfg.image_size, cfg.shapes_per_kind, cfg.test_fraction, cfg.style_words, ctx.seed)
    write_caption_set(data, ctx.out_dir)
    labels, split = data["labels"], data["split"]
    preview = [np.flatnonzero(labels == c)[:8] for c in range(len(class_prompts()))]
    picks = np.concatenate(preview)
    save_grid(data["images"][picks].transpose(0, 2, 3, 1) / 255.0, ctx.out_dir / "preview.png", ncols=8, scale=2)
    metrics = {
        "images": int(len(labels)),
        "train": int((split == 0).sum()),
        "test": int((split == 1).sum()),
        "digits": int((labels < len(DIGIT_WORDS)).sum()),
        "shapes": int((labels >= len(DIGIT_WORDS)).sum()),
        "classes": len(class_prompts()),
        "distinct_captions": len(set(data["captions"])),
        "image_size": cfg.image_size,
    }
    print_figures("t2i_data: image–caption set", metrics)
    return StageResult(
        outputs={"dataset": DATASET_FILE, "captions": CAPTIONS_FILE, "classes": CLASSES_FILE, "preview": "preview.png"},
        metrics=metrics,
    )
