"""Stage registrations and configs of the multimodal recipes (light: no heavy imports).

Two recipes outside the LLM chain, each a chain of the stage registry:
text-to-image `t2i_data -> t2i_vae -> t2i_train`, and NeRF `nerf_data -> nerf_train`; and the
model zoo (multimodal/zoo/registry.py): a stage `zoo_<recipe>` and chain `t2i_data -> zoo_<recipe>`
per recipe, generated below from its registry.
The dataclass defaults are the `tiny` config (a 2-core CPU, minutes); `device="cuda"`
and bigger sizes scale them to a GPU.
"""

from __future__ import annotations

import dataclasses

from multimodal.video_config import VideoDataConfig, VideoTrainConfig
from multimodal.zoo.registry import RECIPES
from pipeline.stage import Stage

T2I_ORDER: tuple[str, ...] = ("t2i_data", "t2i_vae", "t2i_train")
T2I_CONSISTENCY_ORDER: tuple[str, ...] = T2I_ORDER + ("t2i_consistency",)  # `aigc t2i consistency`
NERF_ORDER: tuple[str, ...] = ("nerf_data", "nerf_train")


@dataclasses.dataclass
class T2IDataConfig:
    """Settings of the `t2i_data` stage (digits + drawn shapes, captioned)."""

    image_size: int = 16  # pixels per side (digits are upscaled from 8×8)
    shapes_per_kind: int = 60  # drawn images per colour×shape (4 colours × 3 shapes)
    test_fraction: float = 0.1  # held out from training; the judge's real reference
    style_words: bool = True  # "thick/thin strokes", "small/large" in captions


@dataclasses.dataclass
class T2IVAEConfig:
    """Settings of the `t2i_vae` stage (diffusers AutoencoderKL)."""

    channels: tuple[int, ...] = (16, 32)  # one resolution level each; latent side = image_size / 2**(levels-1)
    latent_channels: int = 4
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    kl_weight: float = 1e-3  # × per-pixel KL against N(0, I)
    device: str = "cpu"


@dataclasses.dataclass
class T2ITrainConfig:
    """Settings of the `t2i_train` stage (text encoder + UNet2DConditionModel or DiT, DDPM/SDE/flow on latents)."""

    objective: str = "ddpm"  # ddpm | vp_sde | ve_sde | flow (multimodal/objectives.py)
    backbone: str = "unet"  # unet (diffusers UNet2DConditionModel) | dit (multimodal/dit.py, adaLN-Zero)
    unet_channels: tuple[int, ...] = (32, 64)  # one resolution level each; cross-attention on all but the last
    text_dim: int = 32  # text encoder width = UNet cross-attention dim
    text_layers: int = 2
    text_heads: int = 2
    pooled_text: bool = True  # also add the pooled text to the timestep embedding (SDXL-style), besides cross-attention
    dit_width: int = 128  # DiT token width
    dit_depth: int = 4  # DiT blocks
    dit_heads: int = 4
    dit_patch: int = 2  # latent pixels per DiT patch side
    epochs: int = 16  # ≈ 1,100 steps at batch 32 on the tiny set (accuracy climbs steeply from ~700 to ~1,000 steps)
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    prompt_dropout: float = 0.1  # share of captions replaced by the empty prompt (trains the unconditional model)
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    sampler: str = "default"  # the objective's default (ddim; ode for vp/ve_sde; heun for flow) or one of its samplers:
    # ddpm: ddim | ddpm | dpm; vp_sde, ve_sde: em | pc | ode; flow: euler | heun — for the grids and the judge
    sample_steps: int = 25
    steps_curve: tuple[int, ...] = (1, 2, 4, 8)  # also judged at grid_guidance: quality_vs_nfe.png (+ sample_steps)
    grid_guidance: float = 3.0  # classifier-free guidance scale of the per-epoch grids
    guidance_scales: tuple[float, ...] = (1.0, 3.0)  # judged; 1.0 = no guidance (conditional model alone)
    eval_per_prompt: int = 20  # generated images per class prompt for the judge
    device: str = "cpu"


@dataclasses.dataclass
class T2IConsistencyConfig:
    """Settings of the `t2i_consistency` stage (consistency distillation or training, multimodal/consistency.py)."""

    mode: str = "distill"  # distill (CD from t2i_train's model) | train (improved CT from scratch, same architecture)
    steps: int = 400  # CD optimiser steps (each: a guided teacher pass, student forward/backward, target forward)
    batch_size: int = 32
    lr: float = 2e-4  # CD: the student starts as the teacher (the teacher's own schedule ends at 2e-4)
    ct_steps: int = 800  # CT from scratch: optimiser steps (each: online forward/backward, target forward)
    ct_lr: float = 2e-3  # CT: the teacher's learning rate
    warmup_steps: int = 20
    loss: str = "huber"  # pseudo-Huber, c = 0.00054·√d | l2
    sigma_max: float = 10.0  # start of sampling, y = σ_max z (10 σ_data; at EDM's 80 the guided teacher's x0 estimate
    # carries its ε error × 80: its 25-step DDIM from there ended at latent std 3.3, from 10 at 1.0, as the data)
    sigma_data: float = 1.0  # the latents' std (the VAE's scaling factor makes it 1)
    intervals: int = 25  # CD: Karras grid intervals between the teacher's σ(t=0) and sigma_max
    solver: str = "ddim"  # CD: teacher ODE step, ddim (Euler in σ) | heun (2 guided teacher passes)
    guidance: float = 3.0  # CD: the guided teacher's CFG scale, distilled; also the teacher's in the comparison
    ema: float = 0.95  # CD: target network θ⁻ ← μ θ⁻ + (1 − μ) θ
    ct_sigma_min: float = 0.002
    ct_start_intervals: int = 10  # CT: grid intervals at the start, doubling in equal stages up to ct_max_intervals
    ct_max_intervals: int = 160
    p_mean: float = -0.4  # CT: ln σ ~ N(p_mean, p_std²) picks the grid interval (iCT's −1.1 for σ_data 0.5, + ln 2)
    p_std: float = 2.0
    sample_steps: tuple[int, ...] = (1, 2, 4)  # judged, and a grid each
    eval_per_prompt: int = 20
    checkpoint_every: int = 100
    device: str = "cpu"


@dataclasses.dataclass
class NerfDataConfig:
    """Settings of the `nerf_data` stage (a ray-traced scene of spheres on a floor)."""

    image_size: int = 64  # pixels per side
    views: int = 48  # camera poses on a ring band around the scene
    test_views: int = 8  # every (views / test_views)-th pose is held out
    fov_deg: float = 40.0
    radius: float = 4.0  # camera distance from the scene centre
    supersample: int = 2  # rays per pixel side (anti-aliasing)


@dataclasses.dataclass
class NerfTrainConfig:
    """Settings of the `nerf_train` stage (positional encoding + MLP, hierarchical sampling)."""

    steps: int = 2400
    rays_per_batch: int = 512
    coarse_samples: int = 24  # stratified samples per ray
    fine_samples: int = 24  # importance samples per ray drawn from the coarse weights
    width: int = 64
    depth: int = 4  # hidden layers before the density head
    pos_freqs: int = 8  # positional-encoding octaves of positions
    dir_freqs: int = 3  # … of view directions
    lr: float = 5e-3
    min_lr: float = 2.5e-4  # end of the exponential decay
    eval_every: int = 300  # steps between held-out evaluations (PSNR/SSIM vs time)
    turntable_frames: int = 24
    device: str = "cpu"


@dataclasses.dataclass
class GsplatConfig:
    """Settings of the `nerf_gsplat` stage (3D Gaussian splatting on nerf_data's views, multimodal/gsplat_train.py)."""

    steps: int = 1500
    init_points: int = 2000  # uniform in a box round the cameras' common focus (no scene geometry used)
    sh_degree: int = 1  # spherical-harmonic colour degree (0-3)
    max_gaussians: int = 6000  # densification stops growing at this count
    lr_means: float = 1.6e-4  # × scene extent, decaying exponentially to 1 %
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacity: float = 5e-2
    lr_sh: float = 2.5e-3  # degree 0; higher degrees at 1/20 of it
    densify_from: int = 200
    densify_until: int = 1200
    densify_every: int = 100
    grad_threshold: float = 2e-4  # mean view-space (NDC) gradient norm that marks a Gaussian to clone/split
    percent_dense: float = 0.01  # × extent: at most this large → clone, else split
    min_opacity: float = 0.005  # pruned below
    max_screen_px: float = 32.0  # pruned above this screen radius (after the first opacity reset)
    reset_every: int = 600  # opacity reset period (0 = never)
    tile: int = 8  # rasterizer tile side (pixels); 8 renders 64² views fastest here (16: 1.5×, 32: 5× slower)
    eval_every: int = 300  # held-out PSNR/SSIM and a checkpoint; a multiple of densify_every
    turntable_frames: int = 24  # (no `device` setting: the PyTorch rasterizer runs on the CPU)


def _files(*names: str) -> tuple[str, ...]:
    """Return repo-relative paths of multimodal modules (the code in a stage's fingerprint)."""
    return tuple(f"multimodal/{n}.py" for n in names)


T2I_DATA_CODE = _files("t2i_data", "pictures")
T2I_VAE_CODE = T2I_DATA_CODE + _files("vae")
CHECKPOINT_CODE = ("recipes/loop_checkpoint.py", "recipes/data_parallel.py")
T2I_TRAIN_CODE = T2I_VAE_CODE + _files("t2i_train", "t2i_model", "t2i_judge", "diffusion", "objectives", "dit",
                                       "text_encoder") + CHECKPOINT_CODE
T2I_CONSISTENCY_CODE = T2I_TRAIN_CODE + _files("consistency", "figures", "zoo/common")
NERF_DATA_CODE = _files("nerf_scene", "pictures")
NERF_TRAIN_CODE = NERF_DATA_CODE + _files("nerf_train", "nerf_model", "image_metrics") + CHECKPOINT_CODE
GSPLAT_CODE = NERF_TRAIN_CODE + _files("gsplat_train", "gsplat_render", "figures")

STAGES = {
    "t2i_data": Stage("t2i_data", T2IDataConfig, "multimodal.t2i_data:run", code=T2I_DATA_CODE,
                      key_metrics=("images", "distinct_captions")),
    "t2i_vae": Stage("t2i_vae", T2IVAEConfig, "multimodal.vae:run", inputs=("t2i_data",), code=T2I_VAE_CODE,
                     key_metrics=("recon_mse_before", "recon_mse_after", "recon_psnr_db")),
    "t2i_train": Stage("t2i_train", T2ITrainConfig, "multimodal.t2i_train:run", inputs=("t2i_data", "t2i_vae"),
                       code=T2I_TRAIN_CODE,
                       key_metrics=("digit_accuracy_g1", "digit_accuracy_g3", "fid_like_g3", "train_s")),
    "t2i_consistency": Stage("t2i_consistency", T2IConsistencyConfig, "multimodal.consistency:run",
                             inputs=("t2i_data", "t2i_vae", "t2i_train"), code=T2I_CONSISTENCY_CODE,
                             key_metrics=("cm_1step_digit_accuracy", "teacher_ddim1_digit_accuracy",
                                          "cm_2step_fid_like", "cm_1step_speedup_images_per_s", "train_s")),
    "nerf_data": Stage("nerf_data", NerfDataConfig, "multimodal.nerf_scene:run", code=NERF_DATA_CODE,
                       key_metrics=("train_views", "test_views")),
    "nerf_train": Stage("nerf_train", NerfTrainConfig, "multimodal.nerf_train:run", inputs=("nerf_data",),
                        code=NERF_TRAIN_CODE, key_metrics=("test_psnr", "test_ssim", "train_s")),
    "nerf_gsplat": Stage("nerf_gsplat", GsplatConfig, "multimodal.gsplat_train:run", inputs=("nerf_data",),
                         code=GSPLAT_CODE, key_metrics=("test_psnr", "test_ssim", "render_frames_per_s", "train_s")),
}

ZOO_CODE = T2I_DATA_CODE + _files("t2i_judge", "figures", "image_metrics", "zoo/common") + CHECKPOINT_CODE  # every zoo stage's


def zoo_stages() -> dict[str, Stage]:
    """Return a stage `zoo_<name>` per zoo recipe: it reads `t2i_data`; its code is the recipe's and the shared."""
    return {r.stage: Stage(r.stage, r.config, r.run, inputs=("t2i_data",),
                           code=tuple(dict.fromkeys(ZOO_CODE + tuple(r.code))), key_metrics=r.key_metrics)
            for r in RECIPES.values()}


STAGES.update(zoo_stages())

VIDEO_ORDER: tuple[str, ...] = ("video_data", "video_train")
VIDEO_DATA_CODE = _files("video_config", "video_data", "t2i_data", "pictures", "figures")
VIDEO_TRAIN_CODE = VIDEO_DATA_CODE + _files("video_train", "video_model", "video_metrics", "diffusion", "text_encoder",
                                            "t2i_judge", "zoo/common", "image_metrics") + CHECKPOINT_CODE
STAGES.update({
    "video_data": Stage("video_data", VideoDataConfig, "multimodal.video_data:run", code=VIDEO_DATA_CODE,
                        key_metrics=("clips", "prompts")),
    "video_train": Stage("video_train", VideoTrainConfig, "multimodal.video_train:run", inputs=("video_data",),
                         code=VIDEO_TRAIN_CODE,
                         key_metrics=("class_accuracy", "motion_accuracy", "warp_error", "fid_like", "train_s")),
})

CHAINS = {"t2i": T2I_ORDER, "t2i_consistency": T2I_CONSISTENCY_ORDER, "nerf": NERF_ORDER, "video": VIDEO_ORDER, "nerf_gsplat": ("nerf_data", "nerf_gsplat"), **{r.stage: ("t2i_data", r.stage) for r in RECIPES.values()}}

COMMANDS = {
    "t2i": ("multimodal.cli:t2i_main", "text-to-image latent diffusion: train | consistency | sample \"a handwritten three\""),
    "nerf": ("multimodal.cli:nerf_main", "NeRF and 3D Gaussian splatting on a ray-traced scene: train | gsplat | "
             "render [--gsplat] --pose az,el"),
    "video": ("multimodal.cli:video_main", "text-to-video diffusion: data | train | sample \"a red circle moving "
              "right\""),
    "zoo": ("multimodal.cli:zoo_main", "generative-model zoo (AE, VAE, VQ-VAE, PixelCNN, GANs, flows): "
            "list | RECIPE train | RECIPE sample"),
}

# Named configs of these recipes: overrides on top of the dataclass defaults (`tiny`).
PRESETS: dict[str, list[str]] = {
    "tiny": [],
    "smoke": [
        "t2i_data.shapes_per_kind=4",
        "t2i_vae.steps=30",
        "t2i_train.unet_channels=16,32",
        "t2i_train.text_dim=16",
        "t2i_train.epochs=1",
        "t2i_train.batch_size=128",
        "t2i_train.eval_per_prompt=2",
        "t2i_train.sample_steps=3",
        "t2i_train.steps_curve=1,2",
        "t2i_train.dit_width=32",
        "t2i_train.dit_depth=2",
        "t2i_consistency.steps=4",
        "t2i_consistency.ct_steps=4",
        "t2i_consistency.batch_size=16",
        "t2i_consistency.warmup_steps=2",
        "t2i_consistency.intervals=6",
        "t2i_consistency.ct_start_intervals=2",
        "t2i_consistency.ct_max_intervals=8",
        "t2i_consistency.eval_per_prompt=2",
        "t2i_consistency.checkpoint_every=2",
        "nerf_data.image_size=16",
        "nerf_data.views=12",
        "nerf_data.test_views=3",
        "nerf_data.supersample=1",
        "nerf_train.steps=60",
        "nerf_train.eval_every=30",
        "nerf_train.rays_per_batch=256",
        "nerf_train.coarse_samples=16",
        "nerf_train.fine_samples=16",
        "nerf_train.width=32",
        "nerf_train.turntable_frames=3",
        "nerf_gsplat.steps=60",
        "nerf_gsplat.init_points=300",
        "nerf_gsplat.densify_from=20",
        "nerf_gsplat.densify_until=50",
        "nerf_gsplat.densify_every=10",
        "nerf_gsplat.reset_every=0",
        "nerf_gsplat.eval_every=30",
        "nerf_gsplat.tile=8",
        "nerf_gsplat.turntable_frames=3",
        "video_data.clips_per_kind=2",
        "video_train.channels=8,16",
        "video_train.text_dim=16",
        "video_train.heads=2",
        "video_train.steps=4",
        "video_train.checkpoint_every=2",
        "video_train.batch_size=4",
        "video_train.sample_steps=2",
        "video_train.eval_per_prompt=1",
        "video_train.judge_frames=300",
        *(line for r in RECIPES.values() for line in r.smoke),
    ],
}
