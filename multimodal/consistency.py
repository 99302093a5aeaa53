"""The `t2i_consistency` stage: consistency models of the t2i latent model, sampled in 1-4 steps.

A consistency function maps any point of a probability-flow ODE trajectory to its origin,
f(y_σ, σ) = y_{σ_min}, written in the variance-exploding coordinates of EDM,
y = x0 + σ ε (a VP latent x_t = √ᾱ x0 + √(1 − ᾱ) ε is y = x_t / √ᾱ, σ = √((1 − ᾱ)/ᾱ)):

    f(y, σ) = c_skip(σ) · y + c_out(σ) · F(c_in(σ) · y, σ)
    c_skip = σ_d² / ((σ − σ_min)² + σ_d²),  c_out = (σ − σ_min) σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²)

so f(y, σ_min) = y holds exactly for any network F (c_skip = 1, c_out = 0). These
scalings, the Karras σ grid (ρ = 7) and the multistep sampler (denoise, re-noise to the
next σ, denoise, ...) are diffusers' `CMStochasticIterativeScheduler`, used as it is: its
`step` takes F. Two modes (Song et al. 2023; Song & Dhariwal 2023, simplified):

- `distill` (CD): the student starts as the trained t2i_train model. Its F is the EDM
  raw output implied by the ε network, F = ((1 − c_skip^EDM) y − σ ε_θ) / c_out^EDM, so that
  f is the teacher's own x0 estimate y − σ ε_θ wherever σ ≫ σ_min. ε_θ sees the VP input
  y / √(1 + σ²) at the teacher's (fractional) timestep of that σ. Each step draws x0 (the VAE
  posterior of a training image), a grid index n and y_{n+1} = x0 + σ_{n+1} z, takes one
  step of the teacher's probability-flow ODE dy/dσ = ε̂ to σ_n (DDIM = Euler in σ, or Heun),
  with classifier-free guidance at scale `guidance` inside ε̂ (the guided teacher: the
  guidance is distilled, so the student samples with one network pass per step), and
  regresses f_θ(y_{n+1}, σ_{n+1}) onto f_θ⁻(ŷ_n, σ_n) of the EMA target network θ⁻ (rate `ema`).
  The text encoder is the teacher's, frozen.
- `train` (CT, from scratch): a fresh backbone of the teacher's architecture and a fresh
  text encoder; no teacher, the pair is y_{n+1} = x0 + σ_{n+1} z and y_n = x0 + σ_n z with one
  z; improved CT: the grid grows from `ct_start_intervals` to `ct_max_intervals` intervals
  (doubling in equal stages), n is drawn from the lognormal noise distribution (P_mean,
  P_std), the target network is the online one without gradient (no EMA), and the loss is
  weighted by 1 / (σ_{n+1} − σ_n). No classifier-free guidance (conditional sampling only).

Both losses are pseudo-Huber, √(‖Δ‖² + c²) − c with c = 0.00054 √d (d = latent dims), or `l2`.
The stage judges the student at each of `sample_steps` against the teacher's DDIM at the
same steps (Euler in σ on the same noise levels from σ_max: teacher_ddim) and at the
teacher's own sampler and steps: digit and shape accuracy, FID-like distance, images/s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, CMStochasticIterativeScheduler, DDPMScheduler
from diffusers import UNet2DConditionModel

from multimodal.diffusion import lr_factor, unet_denoiser
from multimodal.dit import DiT
from multimodal.figures import print_figures
from multimodal.objectives import objective_of
from multimodal.pictures import save_grid, save_line_plot
from multimodal.t2i_data import class_prompts
from multimodal.t2i_judge import judge_images
from multimodal.t2i_model import DIT_DIR, SCHEDULER_DIR, TEXT_DIR, UNET_DIR, T2IModel
from multimodal.t2i_train import GRID_SEEDS, grid_prompts_and_seeds, posterior_stats
from multimodal.text_encoder import TextEncoder, WordTokenizer, load_text_encoder, save_text_encoder
from multimodal.vae import to_model_range
from multimodal.zoo.common import CHECKPOINTS, ZooData, final_loss, get_judge, read_data, train_loop
from pipeline.stage import StageContext, StageResult

TEACHER_SCHEDULER_DIR = "teacher_scheduler"  # distill: the teacher's DDPM schedule (σ -> its timestep)
MODEL_FILE = "consistency.json"
MODES = ("distill", "train")
HUBER_C = 0.00054  # × √d: the pseudo-Huber constant of improved CT


# ---------------------------------------------------------------- the consistency function


def teacher_log_sigmas(teacher_schedule: DDPMScheduler) -> torch.Tensor:
    """Return log σ_t = ½ log((1 − ᾱ_t) / ᾱ_t) of the teacher's timesteps t = 0..T−1 (ascending)."""
    a = teacher_schedule.alphas_cumprod.double()
    return 0.5 * ((1 - a) / a).log()


def teacher_timestep(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Return the teacher's (fractional) timestep of noise levels `sigma` (B,): log σ interpolated linearly."""
    ls = sigma.double().log().clamp(float(log_sigmas[0]), float(log_sigmas[-1]))
    i = torch.searchsorted(log_sigmas, ls).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[i - 1], log_sigmas[i]
    return ((i - 1) + (ls - lo) / (hi - lo)).float()


def _col(v: torch.Tensor) -> torch.Tensor:
    """Return a (B,) or scalar tensor shaped (B, 1, 1, 1) (broadcast over latents)."""
    return v.reshape(-1, 1, 1, 1)


@dataclasses.dataclass
class ConsistencyFunction:
    """f(y, σ) of a backbone: `mode` names how its output becomes F (module docstring)."""

    net: torch.nn.Module  # UNet2DConditionModel or DiT
    schedule: CMStochasticIterativeScheduler
    mode: str  # distill | train
    log_sigmas: torch.Tensor | None = None  # distill: the teacher's log σ_t

    def raw(self, y: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the network output F (B, C, h, w) at points y (B, C, h, w) of noise levels sigma (B,)."""
        denoise = unet_denoiser(self.net) if isinstance(self.net, UNet2DConditionModel) else self.net  # DiT, or a test's
        s = _col(sigma)
        if self.mode == "train":  # EDM input scaling, timestep 250 ln σ (the scheduler's sigma_to_t)
            sd = self.schedule.config.sigma_data
            return denoise(y / (s ** 2 + sd ** 2).sqrt(), 250.0 * sigma.log(), states, mask)
        eps = denoise(y / (1 + s ** 2).sqrt(), teacher_timestep(self.log_sigmas, sigma), states, mask)
        c_skip, c_out = self.schedule.get_scalings(s)  # EDM's: D = c_skip y + c_out F
        return ((1 - c_skip) * y - s * eps) / c_out

    def __call__(self, y: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return f(y, σ) = c_skip y + c_out F: exactly y at σ = σ_min."""
        c_skip, c_out = self.schedule.get_scalings_for_boundary_condition(_col(sigma))
        return c_skip * y + c_out * self.raw(y, sigma, states, mask)


def consistency_sample(f: ConsistencyFunction, states: torch.Tensor, mask: torch.Tensor, seeds: list[int],
                       steps: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Return latents (B, C, h, w) by multistep consistency sampling in `steps` network evaluations.

    CMStochasticIterativeScheduler: y = σ_max z; x0 = f(y, σ_max); then at each later
    σ_k of its grid y = x0 + √(σ_k² − σ_min²) z and x0 = f(y, σ_k). Every image draws its
    starting and step noise from its own seed's generator, so it does not depend on its batch.
    """
    schedule = CMStochasticIterativeScheduler.from_config(f.schedule.config)
    schedule.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    device = states.device
    y = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) * schedule.init_noise_sigma
    for t in schedule.timesteps:
        schedule.scale_model_input(y, t)  # (sets the scheduler's step index; F scales its own input)
        sigma = schedule.sigmas[schedule.step_index].to(device).expand(len(y))
        y = schedule.step(f.raw(y, sigma, states, mask), t, y, generator=gens if len(gens) > 1 else gens[0]).prev_sample
    return y


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Return √(‖a − b‖² + c²) − c per sample (B,) over all other dims; c = 0 gives the L2 distance ‖a − b‖."""
    d = (a - b).flatten(1).pow(2).sum(1)
    return (d + c * c).sqrt() - c


def consistency_loss(online: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Return the mean (optionally weighted) distance between online and target outputs (B, C, h, w)."""
    if kind == "huber":
        d = pseudo_huber(online, target, HUBER_C * math.sqrt(online[0].numel()))
    elif kind == "l2":
        d = (online - target).flatten(1).pow(2).mean(1)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose huber or l2")
    return (d * weight).mean() if weight is not None else d.mean()


# ---------------------------------------------------------------- discretisations


def karras_sigmas(schedule: CMStochasticIterativeScheduler, intervals: int) -> torch.Tensor:
    """Return the Karras grid of `intervals` + 1 noise levels from σ_max down to σ_min (float64)."""
    grid = CMStochasticIterativeScheduler.from_config(schedule.config, num_train_timesteps=intervals + 1)
    return grid.sigmas.double()


def ct_intervals(step: int, total: int, start: int, end: int) -> int:
    """Return improved CT's number of grid intervals at `step` of `total`: `start` doubling in equal stages up to `end`."""
    stages = int(math.log2(max(1, end // start))) + 1
    per_stage = max(1, total // stages)
    return min(start * 2 ** (step // per_stage), end)


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """Return the probability (len − 1,) of each interval [σ_{n+1}, σ_n] of a descending grid under ln σ ~ N(p_mean, p_std²)."""
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[:-1] - cdf[1:]).clamp(min=1e-12)  # descending grid: interval n lies between sigmas[n+1] and sigmas[n]
    return p / p.sum()


# ---------------------------------------------------------------- the trained model


@dataclasses.dataclass
class ConsistencyModel:
    """A trained consistency model with its VAE and text encoder; `generate` is the t2i model's interface."""

    vae: AutoencoderKL
    f: ConsistencyFunction
    text_encoder: TextEncoder
    tokenizer: WordTokenizer

    @classmethod
    def load(cls, vae_dir: Path, stage_dir: Path, device: str = "cpu") -> "ConsistencyModel":
        """Return the model written by the `t2i_consistency` stage in `stage_dir` with the VAE of `vae_dir`."""
        meta = json.loads((stage_dir / MODEL_FILE).read_text())
        vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
        if meta["backbone"] == "dit":
            net = DiT.from_pretrained(stage_dir / DIT_DIR)
        else:
            net = UNet2DConditionModel.from_pretrained(stage_dir / UNET_DIR)
        schedule = CMStochasticIterativeScheduler.from_pretrained(stage_dir / SCHEDULER_DIR)
        log_sigmas = None
        if meta["mode"] == "distill":
            log_sigmas = teacher_log_sigmas(DDPMScheduler.from_pretrained(stage_dir / TEACHER_SCHEDULER_DIR))
        text, tokenizer = load_text_encoder(stage_dir / TEXT_DIR)
        f = ConsistencyFunction(net.to(device).eval(), schedule, meta["mode"], log_sigmas)
        return cls(vae, f, text.to(device).eval(), tokenizer)

    def save(self, stage_dir: Path, teacher_schedule: DDPMScheduler | None) -> None:
        """Write the backbone, text encoder, scheduler (and the teacher's schedule when distilled), consistency.json."""
        backbone = "dit" if isinstance(self.f.net, DiT) else "unet"
        self.f.net.save_pretrained(stage_dir / (DIT_DIR if backbone == "dit" else UNET_DIR), safe_serialization=True)
        save_text_encoder(self.text_encoder, self.tokenizer, stage_dir / TEXT_DIR)
        self.f.schedule.save_pretrained(stage_dir / SCHEDULER_DIR)
        if teacher_schedule is not None:
            teacher_schedule.save_pretrained(stage_dir / TEACHER_SCHEDULER_DIR)
        (stage_dir / MODEL_FILE).write_text(json.dumps({"mode": self.f.mode, "backbone": backbone}) + "\n")

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int, batch_size: int = 256) -> np.ndarray:
        """Return images (B, S, S, 3) in [0, 1], one per (prompt, seed), sampled in `steps` consistency steps."""
        device = next(self.f.net.parameters()).device
        net = self.f.net
        shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
        out = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = self.tokenizer(prompts[start: start + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            latents = consistency_sample(self.f, self.text_encoder(ids, mask), mask, seeds[start: start + batch_size],
                                         steps, shape)
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            out.append(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)


def make_schedule(cfg, teacher_schedule: DDPMScheduler) -> CMStochasticIterativeScheduler:
    """Return the consistency schedule of a mode: distill spans the teacher's σ (its t = 0) to `sigma_max`; train
    spans [ct_sigma_min, sigma_max]. Its num_train_timesteps is the final grid (sampling picks steps from it)."""
    if cfg.mode == "distill":
        sigma_min, intervals = float(teacher_log_sigmas(teacher_schedule)[0].exp()), cfg.intervals
    else:
        sigma_min, intervals = cfg.ct_sigma_min, cfg.ct_max_intervals
    return CMStochasticIterativeScheduler(num_train_timesteps=intervals + 1, sigma_min=sigma_min,
                                          sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data, rho=7.0,
                                          clip_denoised=False)


# ---------------------------------------------------------------- the teacher


@torch.no_grad()
def teacher_ode_step(teacher: T2IModel, log_sigmas: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                     sigma_next: torch.Tensor, cond: tuple, uncond: tuple, guidance: float, solver: str) -> torch.Tensor:
    """Return ŷ at sigma_next (B,) from y at sigma (B,): one step of the guided teacher's probability-flow ODE
    dy/dσ = ε̂(y, σ) (ddim: Euler in σ, exactly DDIM; heun: Heun's second order, two guided evaluations)."""
    denoise = teacher.denoiser()

    def eps(y_: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = y_ / (1 + _col(s) ** 2).sqrt()  # the VP input x_t
        t = teacher_timestep(log_sigmas, s)
        if guidance == 1.0:
            return denoise(x, t, *cond)
        e_u, e_c = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond[0], cond[0]]),
                           torch.cat([uncond[1], cond[1]])).chunk(2)
        return e_u + guidance * (e_c - e_u)

    h = _col(sigma_next - sigma)
    d = eps(y, sigma)
    y_next = y + h * d
    if solver == "heun":
        y_next = y + h * 0.5 * (d + eps(y_next, sigma_next))
    elif solver != "ddim":
        raise ValueError(f"unknown solver {solver!r}; choose ddim or heun")
    return y_next


def teacher_ddim(teacher: T2IModel, schedule: CMStochasticIterativeScheduler, prompts: list[str], seeds: list[int],
                 steps: int, guidance: float, batch_size: int = 256) -> np.ndarray:
    """Return images (B, S, S, 3) of the teacher's guided DDIM in `steps` steps on the consistency sampler's grid.

    DDIM is Euler on dy/dσ = ε̂ in σ (teacher_ode_step): from y = σ_max z through the noise levels the
    consistency sampler visits in `steps` steps, then to σ = 0 (the last step returns the teacher's x0
    estimate, as DDIM's does): the same start and levels as the student. (diffusers' DDIM with 'trailing'
    spacing starts at t = 999, where this schedule's ᾱ ≈ 1e-9 amplifies the ε error of the x0 estimate ~2·10⁴
    times; t2i_train's 'leading' spacing starts at t = 0 for one step.)
    """
    grid = CMStochasticIterativeScheduler.from_config(schedule.config)
    grid.set_timesteps(steps)
    sigmas = torch.cat([grid.sigmas[:-1], torch.zeros(1)]).to(teacher.device)  # σ_max, ..., 0
    log_sigmas = teacher_log_sigmas(teacher.scheduler).to(teacher.device)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk_p, chunk_s = prompts[start: start + batch_size], seeds[start: start + batch_size]
            y = torch.stack([torch.randn(teacher.latent_shape(), generator=torch.Generator().manual_seed(s))
                             for s in chunk_s]).to(teacher.device) * sigmas[0]
            cond, uncond = teacher.encode_prompts(chunk_p), teacher.encode_prompts([""] * len(chunk_p))
            for hi, lo in zip(sigmas[:-1], sigmas[1:]):
                y = teacher_ode_step(teacher, log_sigmas, y, hi.expand(len(y)), lo.expand(len(y)), cond, uncond,
                                     guidance, "ddim")
            out.append(teacher.decode(y).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- the stage


def judged(generate, judge, per_prompt: int) -> dict:
    """Return the judge's figures of `generate(prompts, seeds)` over every class prompt, with images per second."""
    prompts = class_prompts()
    classes = np.repeat(np.arange(len(prompts)), per_prompt)
    started = time.time()
    images = generate([prompts[c] for c in classes], [10_000 + i for i in range(len(classes))])
    seconds = time.time() - started
    j = judge_images(judge, images, classes)
    return {"digit_accuracy": round(j["digit_accuracy"], 4), "shape_accuracy": round(j["shape_accuracy"], 4),
            "fid_like": round(j["fid_like"], 3), "images_per_s": round(len(images) / max(seconds, 1e-9), 1)}


def evaluate(model: ConsistencyModel, teacher: T2IModel, data: ZooData, cfg, teacher_cfg: dict, seed: int) -> dict:
    """Return the judged rows: the consistency model at each of `sample_steps`, the teacher's DDIM at the same steps
    on the distillation grid's noise levels (guidance `guidance`), and the teacher's own sampler at its steps."""
    judge = get_judge(data, cfg.eval_per_prompt, seed)  # t2i_judge's, built once per process
    grid = make_schedule(dataclasses.replace(cfg, mode="distill"), teacher.scheduler)
    rows = []
    for steps in cfg.sample_steps:
        r = judged(lambda p, s: model.generate(p, s, steps), judge, cfg.eval_per_prompt)
        rows.append({"model": f"cm_{cfg.mode}", "sampler": "consistency", "steps": steps, "nfe": steps, **r})
    for steps in cfg.sample_steps:
        r = judged(lambda p, s: teacher_ddim(teacher, grid, p, s, steps, cfg.guidance), judge, cfg.eval_per_prompt)
        rows.append({"model": "teacher", "sampler": "ddim", "steps": steps, "nfe": steps, **r})
    steps, sampler = teacher_cfg["sample_steps"], teacher_cfg["sampler"]
    r = judged(lambda p, s: teacher.generate(p, s, steps, cfg.guidance, sampler), judge, cfg.eval_per_prompt)
    rows.append({"model": "teacher", "sampler": sampler, "steps": steps, "nfe": steps, "default": True, **r})
    return {"judge_real_test_accuracy": round(judge.real_test_accuracy, 4), "fid_like_real_floor": round(judge.floor, 3),
            "guidance": cfg.guidance, "per_prompt": cfg.eval_per_prompt, "rows": rows}


def flat_metrics(quality: dict) -> dict:
    """Return the manifest's figures from the judged rows: cm_<n>step_*, teacher_ddim<n>_*, teacher_default_*,
    and the speed-up of the 1-step model over the teacher's default (images/s ratio)."""
    out = {}
    default = next(r for r in quality["rows"] if r.get("default"))
    for r in quality["rows"]:
        key = ("teacher_default" if r.get("default") else
               f"teacher_ddim{r['steps']}" if r["model"] == "teacher" else f"cm_{r['steps']}step")
        out.update({f"{key}_{k}": r[k] for k in ("digit_accuracy", "shape_accuracy", "fid_like", "images_per_s")})
        if r["model"] != "teacher":
            out[f"cm_{r['steps']}step_speedup_images_per_s"] = round(r["images_per_s"] / default["images_per_s"], 2)
    out["teacher_default_steps"] = default["steps"]
    return out


def read_teacher_settings(ctx: StageContext) -> dict:
    """Return the teacher's sampler and steps, as its manifest records them."""
    metrics = ctx.inputs["t2i_train"]["metrics"]
    return {"sampler": metrics["sampler"], "sample_steps": int(metrics["sample_steps"])}


def fresh_copy(teacher: T2IModel) -> tuple[torch.nn.Module, TextEncoder]:
    """Return an untrained backbone and text encoder of the teacher's architecture (CT from scratch)."""
    net = type(teacher.unet).from_config(teacher.unet.config)
    text = TextEncoder(**teacher.text_encoder.config)
    return net, text


def run(ctx: StageContext) -> StageResult:
    """Distil (or train) a consistency model, write it, grids per step count and the judged comparison."""
    cfg = ctx.config
    if cfg.mode not in MODES:
        raise ValueError(f"t2i_consistency.mode={cfg.mode!r}: choose distill or train")
    torch.manual_seed(ctx.seed)
    device = cfg.device
    zoo_data = read_data(ctx.input_path("t2i_data", "dataset").parent)
    data = zoo_data.raw  # read_caption_set's dict
    vae_dir, train_dir = ctx.input_path("t2i_vae", "vae"), ctx.input_path("t2i_train", "text_encoder").parent
    teacher = T2IModel.load(vae_dir, train_dir, device)
    if objective_of(teacher.scheduler) != "ddpm":
        raise ValueError(f"t2i_consistency distils a ddpm teacher; t2i_train's objective is "
                         f"{objective_of(teacher.scheduler)!r}")
    for p in [*teacher.unet.parameters(), *teacher.text_encoder.parameters()]:
        p.requires_grad_(False)
    keep = data["split"] == 0
    mean, std = posterior_stats(teacher.vae, to_model_range(data["images"][keep]))  # (N, C, h, w)
    ids, mask = teacher.tokenizer([c for c, k in zip(data["captions"], keep) if k])  # (N, L)
    schedule = make_schedule(cfg, teacher.scheduler)
    log_sigmas = teacher_log_sigmas(teacher.scheduler).to(device)
    if cfg.mode == "distill":
        net, text = copy.deepcopy(teacher.unet), teacher.text_encoder
        net.requires_grad_(True)
        trainable = list(net.parameters())
        null_ids, null_mask = (v.to(device) for v in teacher.tokenizer([""]))  # (1, L)
        with torch.no_grad():
            null_states = text(null_ids, null_mask)  # (1, L, D)
        grid = karras_sigmas(schedule, cfg.intervals).to(device)
    else:
        net, text = fresh_copy(teacher)
        net, text = net.to(device), text.to(device)
        trainable = list(net.parameters()) + list(text.parameters())
    net.register_to_config(_name_or_path="")  # not the teacher's path: the written config is the same in any run dir
    f = ConsistencyFunction(net, schedule, cfg.mode, log_sigmas if cfg.mode == "distill" else None)
    target = ConsistencyFunction(copy.deepcopy(net), schedule, cfg.mode, f.log_sigmas) if cfg.mode == "distill" else f
    total, lr = (cfg.steps, cfg.lr) if cfg.mode == "distill" else (cfg.ct_steps, cfg.ct_lr)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(ctx.seed)
    batch = min(cfg.batch_size, len(ids))

    def step(i: int) -> dict[str, float]:
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)).to(device)  # (B, C, h, w)
        z = torch.randn(x0.shape, generator=gen).to(device)
        b_ids, b_mask = ids[idx].to(device), mask[idx].to(device)
        if cfg.mode == "distill":
            n = torch.randint(0, cfg.intervals, (batch,), generator=gen).to(device)
            hi, lo = grid[n].float(), grid[n + 1].float()  # σ_{n+1} > σ_n
            with torch.no_grad():
                states = text(b_ids, b_mask)  # (B, L, D), the frozen teacher's
                uncond = (null_states.expand_as(states), null_mask.expand_as(b_mask))
                y_lo = teacher_ode_step(teacher, log_sigmas, x0 + _col(hi) * z, hi, lo, (states, b_mask), uncond,
                                        cfg.guidance, cfg.solver)
                tgt = target(y_lo, lo, states, b_mask)
            weight = None
        else:
            sigmas = karras_sigmas(schedule, ct_intervals(i, total, cfg.ct_start_intervals, cfg.ct_max_intervals))
            n = torch.multinomial(lognormal_index_probs(sigmas, cfg.p_mean, cfg.p_std), batch, replacement=True,
                                  generator=gen)
            hi, lo = sigmas[n].float().to(device), sigmas[n + 1].float().to(device)
            states = text(b_ids, b_mask)
            with torch.no_grad():
                tgt = f(x0 + _col(lo) * z, lo, states.detach(), b_mask)
            weight = 1.0 / (hi - lo)
        loss = consistency_loss(f(x0 + _col(hi) * z, hi, states, b_mask), tgt, cfg.loss, weight)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(i, total, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if cfg.mode == "distill":  # θ⁻ ← μ θ⁻ + (1 − μ) θ
            with torch.no_grad():
                for p_t, p in zip(target.net.parameters(), net.parameters()):
                    p_t.lerp_(p, 1 - cfg.ema)
        return {"loss": loss.item()}

    modules = {"net": net, **({"target": target.net} if cfg.mode == "distill" else {"text": text})}
    log = train_loop(ctx, cfg.mode, modules, {"adamw": opt}, total, step, gen, cfg.checkpoint_every)
    for m in (net, text, teacher.unet):
        m.eval()
    model = ConsistencyModel(teacher.vae, f, text, teacher.tokenizer)
    model.save(ctx.out_dir, teacher.scheduler if cfg.mode == "distill" else None)
    shutil.rmtree(ctx.out_dir / CHECKPOINTS, ignore_errors=True)

    grid_p, grid_s, grid_rows = grid_prompts_and_seeds(class_prompts())
    pictures = {}
    for steps in cfg.sample_steps:
        name = f"samples_{steps}step.png"
        save_grid(model.generate(grid_p, grid_s, steps), ctx.out_dir / name, GRID_SEEDS, 3, grid_rows)
        pictures[f"samples_{steps}step"] = name
    history = log["history"]
    window = max(1, total // 20)
    save_line_plot({"loss (moving avg)": [(s, float(np.mean([v for _, v in history[max(0, i - window + 1): i + 1]])))
                                          for i, (s, _) in enumerate(history)]},
                   ctx.out_dir / "loss_curve.png", f"consistency {cfg.mode} loss ({cfg.loss})", "step")

    started = time.time()
    quality = evaluate(model, teacher, zoo_data, cfg, read_teacher_settings(ctx), ctx.seed)
    quality["eval_s"] = round(time.time() - started, 1)
    (ctx.out_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    series = {}
    for r in quality["rows"]:
        if not r.get("default"):
            series.setdefault(f"{r['model']} digits", []).append((r["steps"], r["digit_accuracy"]))
    save_line_plot(series, ctx.out_dir / "quality_vs_steps.png",
                   f"consistency ({cfg.mode}) vs teacher DDIM: digit accuracy", "steps (network evaluations)")
    metrics = {
        "mode": cfg.mode,
        "backbone": "dit" if isinstance(net, DiT) else "unet",
        "params": sum(p.numel() for p in net.parameters()) + (sum(p.numel() for p in text.parameters())
                                                            if cfg.mode == "train" else 0),
        "steps": total,
        "final_loss": final_loss(history),
        "train_s": round(log["train_s"], 1),
        "judge_real_test_accuracy": quality["judge_real_test_accuracy"],
        "fid_like_real_floor": quality["fid_like_real_floor"],
        **flat_metrics(quality),
        "eval_s": quality["eval_s"],
    }
    print_figures(f"t2i_consistency ({cfg.mode})", metrics)
    return StageResult(
        outputs={metrics["backbone"]: DIT_DIR if metrics["backbone"] == "dit" else UNET_DIR, "text_encoder": TEXT_DIR,
                 "scheduler": SCHEDULER_DIR, "model": MODEL_FILE, "quality": "quality.json",
                 "loss_curve": "loss_curve.png", "quality_vs_steps": "quality_vs_steps.png", **pictures,
                 **({"teacher_scheduler": TEACHER_SCHEDULER_DIR} if cfg.mode == "distill" else {})},
        metrics=metrics,
    )
