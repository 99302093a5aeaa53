"""Settings of the video diffusion recipe `video_data -> video_train` (light: no heavy imports).

The dataclass defaults are the `tiny` config: pixel-space clips of 8 frames at 16×16, a
factorised space–time denoiser trained in ≤ 10 minutes on a 2-core CPU; `device="cuda"`
and bigger sizes scale them to a GPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class VideoDataConfig:
    """Settings of the `video_data` stage (captioned clips of a shape or digit moving in a straight line)."""

    frame_size: int = 16  # pixels per side of a frame
    frames: int = 8  # frames per clip
    sprite_size: int = 8  # pixels per side of the moving object (digits at sklearn's native 8×8)
    speed: int = 1  # pixels per frame (an integer: frame t+1 is frame t shifted exactly)
    clips_per_kind: int = 24  # clips per object × direction (22 objects × 4 directions)
    digits: bool = True  # include the handwritten digits (white) besides the coloured shapes
    test_fraction: float = 0.1  # held out from training; the judge's and the metrics' real reference


@dataclasses.dataclass
class VideoTrainConfig:
    """Settings of the `video_train` stage (text encoder + factorised space–time denoiser, DDPM in pixel space)."""

    channels: tuple[int, ...] = (24, 48)  # widths at full and half resolution
    temporal: str = "conv"  # conv (1-D over frames, (2+1)-D) | attention | none (frames denoised independently)
    # (benchmarks/video.py: conv had the lowest warp error and FID-like of the two, in 2/3 of attention's time)
    heads: int = 4  # of the temporal, spatial and cross-attention layers
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    steps: int = 1000  # ≈ 0.52 CPU s each at the defaults on 1 thread: ≈ 9 minutes on a quiet core
    batch_size: int = 16  # clips per step
    lr: float = 2e-3
    warmup_steps: int = 50
    prompt_dropout: float = 0.1  # share of captions replaced by the empty prompt (for classifier-free guidance)
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "sample"  # what the denoiser predicts: sample (the clean clip) | epsilon | v_prediction
    # (measured, 300 steps, shapes: class accuracy 0.45 / 0.10 / 0.20 and FID-like 11 / 3805 / 46: ε-prediction
    # left visible noise in the mostly black frames of a short training)
    sample_steps: int = 20  # DDIM steps
    guidance: float = 2.0  # classifier-free guidance scale of the judged samples and the GIF grid
    eval_per_prompt: int = 2  # generated clips per caption prompt (22 objects × 4 directions) for the metrics
    judge_frames: int = 4000  # frames of training clips the per-frame judge (an MLP) is fitted on
    checkpoint_every: int = 200
    device: str = "cpu"
