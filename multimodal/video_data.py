"""The `video_data` stage: captioned clips of one object moving in a straight line ("a red circle moving left").

The objects are the t2i caption set's: scikit-learn's handwritten digits (white, at their
native 8×8) and circles, squares and triangles in four colours (multimodal.t2i_data.draw_shape,
drawn at 4× and downsampled into a sprite). A clip pastes one sprite on a black frame and moves
it `speed` whole pixels per frame left, right, up or down, starting where the whole path stays
inside the frame (the start across the motion is random): frame t+1 is frame t shifted exactly,
so the caption's motion is a known flow (the metrics' warping error). Every clip has an object
class (t2i's class ids: digits 0–9, then colour×shape) and a direction; the set is deterministic
for a seed and split train/test at random.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from multimodal.figures import print_figures
from multimodal.pictures import image_grid, save_gif
from multimodal.t2i_data import COLOURS, DIGIT_WORDS, SHAPES, class_prompts, digit_images, draw_shape
from pipeline.stage import StageContext, StageResult

DIRECTIONS = ("left", "right", "up", "down")
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image axes (y down)
CLIPS_FILE = "clips.safetensors"
CAPTIONS_FILE = "captions.jsonl"
META_FILE = "meta.json"  # the set's geometry: frame_size, frames, sprite_size, speed, digits


def caption(object_class: int, direction: int) -> str:
    """Return the caption of an object class moving in a direction: "a red circle moving left"."""
    return f"{class_prompts()[object_class]} moving {DIRECTIONS[direction]}"


def objects(digits: bool) -> list[int]:
    """Return the object classes of the set: the digits (if `digits`) and every colour×shape."""
    return [*(range(len(DIGIT_WORDS)) if digits else ()),
            *range(len(DIGIT_WORDS), len(DIGIT_WORDS) + len(COLOURS) * len(SHAPES))]


def prompts(digits: bool) -> list[tuple[int, int, str]]:
    """Return (object class, direction, caption) of every caption prompt of the set."""
    return [(c, d, caption(c, d)) for c in objects(digits) for d in range(len(DIRECTIONS))]


def path(direction: int, frame_size: int, sprite_size: int, frames: int, speed: int,
         rng: np.random.Generator) -> np.ndarray:
    """Return the sprite's top-left corner (frames, 2) as (x, y) per frame: a straight path inside the frame."""
    room = frame_size - sprite_size
    travel = speed * (frames - 1)
    if travel > room:
        raise ValueError(f"{frames} frames at {speed} px/frame need {travel} px of room; a {sprite_size}-px "
                         f"sprite in a {frame_size}-px frame has {room}")
    dx, dy = VELOCITY[DIRECTIONS[direction]]
    along = int(rng.integers(0, room - travel + 1))  # the start along the motion: the path fits
    across = int(rng.integers(0, room + 1))
    start = np.array([along if dx > 0 else room - along, across] if dx else
                     [across, along if dy > 0 else room - along])
    return start + np.arange(frames)[:, None] * speed * np.array([dx, dy])


def render_clip(sprite: np.ndarray, corners: np.ndarray, frame_size: int) -> np.ndarray:
    """Return the clip (T, 3, F, F) uint8 of `sprite` (3, s, s) pasted at each frame's corner (x, y) on black."""
    s = sprite.shape[-1]
    clip = np.zeros((len(corners), 3, frame_size, frame_size), dtype=np.uint8)
    for t, (x, y) in enumerate(corners):
        clip[t, :, y: y + s, x: x + s] = sprite
    return clip


def build_clips(cfg, seed: int) -> dict:
    """Return {clips (N, T, 3, F, F) uint8, labels (N,), directions (N,), split (N,) 0=train 1=test, captions [N]}."""
    rng = np.random.default_rng(seed)
    digit_img, digit_lab, _ = digit_images(cfg.sprite_size, style_words=False)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    clips, labels, directions, captions = [], [], [], []
    for obj, direction, text in prompts(cfg.digits):
        for _ in range(cfg.clips_per_kind):
            if obj < len(DIGIT_WORDS):
                sprite = digit_img[rng.choice(np.flatnonzero(digit_lab == obj))]
            else:
                colour, shape = kinds[obj - len(DIGIT_WORDS)]
                sprite, _ = draw_shape(shape, COLOURS[colour], cfg.sprite_size, rng)
            corners = path(direction, cfg.frame_size, cfg.sprite_size, cfg.frames, cfg.speed, rng)
            clips.append(render_clip(sprite, corners, cfg.frame_size))
            labels.append(obj)
            directions.append(direction)
            captions.append(text)
    split = (np.random.default_rng(seed + 1).random(len(labels)) < cfg.test_fraction).astype(np.uint8)
    return {"clips": np.stack(clips), "labels": np.array(labels, dtype=np.int64),
            "directions": np.array(directions, dtype=np.int64), "split": split, "captions": captions}


def write_clips(data: dict, out_dir: Path, meta: dict) -> None:
    """Write the set as clips.safetensors + captions.jsonl + meta.json (`meta`: its geometry) under out_dir."""
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in ("clips", "labels", "directions", "split")},
              str(out_dir / CLIPS_FILE))
    with open(out_dir / CAPTIONS_FILE, "w") as f:
        for i, text in enumerate(data["captions"]):
            f.write(json.dumps({"index": i, "caption": text, "label": int(data["labels"][i]),
                                "direction": DIRECTIONS[data["directions"][i]],
                                "split": "test" if data["split"][i] else "train"}) + "\n")


def read_clips(data_dir: Path) -> dict:
    """Return the set written by `write_clips` (numpy arrays, captions list, meta dict)."""
    data = {k: v.numpy() for k, v in load_file(str(data_dir / CLIPS_FILE)).items()}
    data["meta"] = json.loads((data_dir / META_FILE).read_text())
    with open(data_dir / CAPTIONS_FILE) as f:
        data["captions"] = [json.loads(line)["caption"] for line in f]
    return data


def save_clip_grid(clips: np.ndarray, path: Path, ncols: int, scale: int = 3, frame_ms: int = 150) -> Path:
    """Write clips (N, T, H, W, 3) in [0, 1] as one animated GIF: a grid of `ncols` clips per row; return path."""
    frames = np.stack([np.asarray(image_grid(clips[:, t], ncols, scale)) / 255.0 for t in range(clips.shape[1])])
    return save_gif(frames, path, frame_ms=frame_ms)


def save_filmstrip(clips: np.ndarray, path: Path, scale: int = 3) -> Path:
    """Write clips (N, T, H, W, 3) in [0, 1] as a PNG: one clip per row, its frames left to right; return path."""
    n, t = clips.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(clips.reshape(n * t, *clips.shape[2:]), t, scale).save(path)
    return path


def as_frames(clips_uint8: np.ndarray) -> np.ndarray:
    """Return uint8 clips (N, T, 3, F, F) as floats (N, T, F, F, 3) in [0, 1]."""
    return clips_uint8.transpose(0, 1, 3, 4, 2) / 255.0


def run(ctx: StageContext) -> StageResult:
    """Build and write the clip set and its previews; return its outputs and counts."""
    cfg = ctx.config
    data = build_clips(cfg, ctx.seed)
    write_clips(data, ctx.out_dir, dataclasses.asdict(cfg))
    labels, directions, split = data["labels"], data["directions"], data["split"]
    picks = [int(np.flatnonzero((labels == c) & (directions == d))[0])
             for c in objects(cfg.digits)[::3] for d in range(len(DIRECTIONS))]
    save_clip_grid(as_frames(data["clips"][picks]), ctx.out_dir / "preview.gif", ncols=len(DIRECTIONS))
    save_filmstrip(as_frames(data["clips"][picks[:8]]), ctx.out_dir / "preview.png")
    metrics = {
        "clips": int(len(labels)),
        "train": int((split == 0).sum()),
        "test": int((split == 1).sum()),
        "frames": cfg.frames,
        "frame_size": cfg.frame_size,
        "objects": len(objects(cfg.digits)),
        "prompts": len(prompts(cfg.digits)),
    }
    print_figures("video_data: captioned moving-object clips", metrics)
    return StageResult(outputs={"clips": CLIPS_FILE, "captions": CAPTIONS_FILE, "meta": META_FILE, "preview": "preview.gif",
                                "filmstrip": "preview.png"}, metrics=metrics)
