"""Measured video quality: what a clip shows (a per-frame judge), whether it moves as its caption says,
and how consistent its frames are.

Clips here are floats (N, T, H, W, 3) in [0, 1] on a black background.

- Per-frame judge (multimodal.t2i_judge's MLP, trained on the frames of the training clips):
  class accuracy (the exact object: digit, or colour×shape), object accuracy (the digit, or the
  shape whatever its colour) and colour accuracy (shapes: the colour whatever the shape), each the
  share of frames; an FID-like distance of the judge's features of the frames against real frames.
- Motion: the object's centroid (intensity-weighted) in every frame, its least-squares velocity
  (px/frame); the clip's direction is the caption direction with the largest velocity component
  along it, if at least `MIN_SPEED`. Motion accuracy = share of clips whose direction is the
  caption's (chance: 1/4; a static clip scores 0).
- Temporal consistency: the mean absolute frame-to-frame difference (beside the real clips'); the
  warping error: the mean absolute difference between frame t shifted by the caption's motion
  (`speed` px in its direction) and frame t+1 (0 for a real clip); identity consistency: the
  share of frames the judge gives the clip's majority class.
"""

from __future__ import annotations

import numpy as np

from multimodal.t2i_data import DIGIT_WORDS, SHAPES
from multimodal.t2i_judge import Judge, frechet_distance, judge_features, pixels
from multimodal.video_data import DIRECTIONS, VELOCITY

MIN_SPEED = 0.25  # px/frame along the caption's direction that counts as moving


def centroids(clips: np.ndarray) -> np.ndarray:
    """Return the intensity-weighted centroid (N, T, 2) as (x, y) of every frame (the frame centre if black)."""
    weight = clips.max(-1)  # (N, T, H, W): brightness of the brightest channel
    h, w = weight.shape[-2:]
    total = weight.sum((-2, -1))
    safe = np.where(total > 1e-6, total, 1.0)
    x = np.where(total > 1e-6, (weight * np.arange(w)).sum((-2, -1)) / safe, (w - 1) / 2)
    y = np.where(total > 1e-6, (weight * np.arange(h)[:, None]).sum((-2, -1)) / safe, (h - 1) / 2)
    return np.stack([x, y], axis=-1)


def velocities(clips: np.ndarray) -> np.ndarray:
    """Return the least-squares centroid velocity (N, 2) as (vx, vy) in px/frame of every clip."""
    c = centroids(clips)  # (N, T, 2)
    t = np.arange(c.shape[1]) - (c.shape[1] - 1) / 2
    return (c * t[None, :, None]).sum(1) / (t ** 2).sum()


def predicted_directions(clips: np.ndarray) -> np.ndarray:
    """Return the direction index of every clip's motion (N,), or -1 where it moves less than MIN_SPEED."""
    units = np.array([VELOCITY[d] for d in DIRECTIONS], dtype=np.float64)  # (4, 2)
    along = velocities(clips) @ units.T  # (N, 4)
    best = along.argmax(1)
    return np.where(along.max(1) >= MIN_SPEED, best, -1)


def motion_figures(clips: np.ndarray, directions: np.ndarray) -> dict:
    """Return motion accuracy (share of clips moving in their caption's direction) and the mean speed along it."""
    units = np.array([VELOCITY[DIRECTIONS[d]] for d in directions], dtype=np.float64)  # (N, 2)
    return {"motion_accuracy": float((predicted_directions(clips) == directions).mean()),
            "speed_along_caption": float((velocities(clips) * units).sum(1).mean())}


def shift(frames: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Return frames (..., H, W, 3) moved by (dx, dy) whole pixels, black where nothing moved in."""
    out = np.zeros_like(frames)
    h, w = frames.shape[-3:-1]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd, :] = frames[..., ys, xs, :]
    return out


def consistency_figures(clips: np.ndarray, directions: np.ndarray, speed: int) -> dict:
    """Return the mean frame-to-frame difference and the warping error under the caption's motion."""
    warped = np.stack([shift(clip[:-1], *(speed * v for v in VELOCITY[DIRECTIONS[d]]))
                       for clip, d in zip(clips, directions)])
    return {"frame_difference": float(np.abs(np.diff(clips, axis=1)).mean()),
            "warp_error": float(np.abs(warped - clips[:, 1:]).mean())}


def judge_figures(judge: Judge, clips: np.ndarray, classes: np.ndarray) -> dict:
    """Return the per-frame judge's class, object and colour accuracy, identity consistency and FID-like distance
    of clips (N, T, H, W, 3) meant to show object `classes` (N,)."""
    n, frames = clips.shape[:2]
    flat = clips.reshape(n * frames, *clips.shape[2:])
    predicted = judge.classifier.predict(pixels(flat)).reshape(n, frames)
    target = np.repeat(classes[:, None], frames, 1)
    digit = target < len(DIGIT_WORDS)
    shape_of = lambda c: (c - len(DIGIT_WORDS)) % len(SHAPES)  # noqa: E731
    colour_of = lambda c: (c - len(DIGIT_WORDS)) // len(SHAPES)  # noqa: E731
    pred_shape = predicted >= len(DIGIT_WORDS)
    object_ok = np.where(digit, predicted == target, pred_shape & (shape_of(predicted) == shape_of(target)))
    colour_ok = pred_shape & (colour_of(predicted) == colour_of(target))
    majority = np.array([np.bincount(row).argmax() for row in predicted])
    return {
        "class_accuracy": float((predicted == target).mean()),
        "object_accuracy": float(object_ok.mean()),
        "colour_accuracy": float(colour_ok[~digit].mean()) if (~digit).any() else None,
        "identity_consistency": float((predicted == majority[:, None]).mean()),
        "fid_like": frechet_distance(judge_features(judge.classifier, flat), judge.reference),
    }


def clip_figures(judge: Judge, clips: np.ndarray, classes: np.ndarray, directions: np.ndarray, speed: int) -> dict:
    """Return every figure of clips (N, T, H, W, 3) captioned with object `classes` and `directions` (N,)."""
    return {**judge_figures(judge, clips, classes), **motion_figures(clips, directions),
            **consistency_figures(clips, directions, speed)}
