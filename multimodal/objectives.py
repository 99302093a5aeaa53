"""Training objectives of the latent model and their samplers: one loss and one sampling entry point.

An objective is named by the diffusers scheduler that holds its schedule (saved with the model):

| objective | scheduler (config saved) | network predicts | samplers |
|---|---|---|---|
| `ddpm`   | DDPMScheduler (discrete, 1000 steps) | ε | `ddim`, `ddpm`, `dpm` (diffusers DDIM, DDPM, DPM-Solver++ 2M) |
| `vp_sde` | ScoreSdeVpScheduler (β 0.1 → 20) | ε (score = −ε/σ_t) | `em`, `pc`, `ode` (ours) |
| `ve_sde` | ScoreSdeVeScheduler (σ 0.01 → σ_max) | ε of x/√(1+σ²) | `em`, `pc`, `ode` (ours) |
| `flow`   | FlowMatchEulerDiscreteScheduler | v = ε − x0 | `euler` (diffusers), `heun` (ours) |

Continuous time t ∈ (0, 1] reaches the network as 1000·t. The SDEs (Song et al. 2021):
VP dx = −½β(t)x dt + √β(t) dW, x_t = α_t x0 + σ_t ε with α_t = exp(−¼t²(β1−β0) − ½tβ0),
σ_t² = 1 − α_t²; VE dx = √(dσ²/dt) dW, σ_t = σ_min (σ_max/σ_min)^t. Their samplers are
ours: diffusers' ScoreSdeVpScheduler is deprecated and has only an Euler–Maruyama step,
and ScoreSdeVeScheduler's corrector sizes its step by norms averaged over the whole batch
(an image would depend on its batch-mates); both have no probability-flow ODE. The SDE
samplers step on a uniform time grid 1 = t_0 > … > t_{N−1} and end with the denoised
mean E[x0 | x_{t_{N−1}}] (as DDIM's last step does), so N steps cost N network
evaluations (`em`), 2N − 1 (`pc`: a Langevin corrector after each Euler–Maruyama step but the
last, its step size from the expected score norm √d/σ_t, the same for every sample; `ode`: Heun's
method on the probability-flow ODE). Flow matching
(rectified flow) interpolates x_t = (1 − t) x0 + t ε; its samplers integrate dx/dt = v from
t = 1 to 0 on the uniform grid t_i = 1 − i/N: Euler (diffusers' FlowMatchEuler with these
sigmas) or Heun (2N − 1 evaluations).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, ScoreSdeVeScheduler
from diffusers.schedulers import ScoreSdeVpScheduler

from multimodal.diffusion import Denoiser, diffusion_loss, guided_eps, make_sampler, make_train_scheduler, sample

SAMPLERS = {
    "ddpm": ("ddim", "ddpm", "dpm"),
    "vp_sde": ("em", "pc", "ode"),
    "ve_sde": ("em", "pc", "ode"),
    "flow": ("euler", "heun"),
}
DEFAULT_SAMPLER = {"ddpm": "ddim", "vp_sde": "ode", "ve_sde": "ode", "flow": "heun"}
SCHEDULERS = {"ddpm": DDPMScheduler, "vp_sde": ScoreSdeVpScheduler, "ve_sde": ScoreSdeVeScheduler,
              "flow": FlowMatchEulerDiscreteScheduler}
TIME_SCALE = 1000.0  # continuous t ∈ (0, 1] -> network timestep 1000·t
CORRECTOR_SNR = 0.16  # Langevin corrector's signal-to-noise ratio (Song et al.'s value)


def make_schedule(objective: str, timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                  ve_sigma_max: float = 50.0):
    """Return the diffusers scheduler holding `objective`'s noise schedule (the one saved with the model)."""
    if objective == "ddpm":
        return make_train_scheduler(timesteps, beta_schedule)
    if objective == "vp_sde":
        return ScoreSdeVpScheduler(beta_min=0.1, beta_max=20.0, sampling_eps=1e-3)
    if objective == "ve_sde":
        return ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=ve_sigma_max, sampling_eps=1e-5)
    if objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(SAMPLERS)}")


def objective_of(schedule) -> str:
    """Return the objective whose schedule `schedule` is (by its scheduler class)."""
    for name, cls in SCHEDULERS.items():
        if type(schedule) is cls:
            return name
    raise ValueError(f"no objective uses a {type(schedule).__name__}")


def resolve_sampler(objective: str, sampler: str | None) -> str:
    """Return `sampler`, or the objective's default for None/'default'; raise ValueError for one it lacks."""
    if sampler in (None, "", "default"):
        return DEFAULT_SAMPLER[objective]
    if sampler not in SAMPLERS[objective]:
        raise ValueError(f"objective {objective!r} samples with {', '.join(SAMPLERS[objective])}, not {sampler!r}")
    return sampler


# ---------------------------------------------------------------- the two SDEs


class SDE:
    """x_t = α_t x0 + σ_t ε with forward SDE dx = f(t) x dt + g(t) dW; the network sees c_in(t) · x_t."""

    t_min: float = 1e-3

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (α_t, σ_t) at times t."""
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (f(t), g(t)²) of the forward SDE dx = f(t) x dt + g(t) dW."""
        raise NotImplementedError

    def c_in(self, t: torch.Tensor) -> torch.Tensor:
        """Return the factor scaling x_t before the network (1 for VP)."""
        return torch.ones_like(t)

    def prior_std(self) -> float:
        """Return the standard deviation of x_1 (the starting noise's scale)."""
        return 1.0


class VPSDE(SDE):
    """Variance preserving: β(t) = β0 + t (β1 − β0)."""

    def __init__(self, beta_min: float, beta_max: float, t_min: float = 1e-3):
        self.b0, self.b1, self.t_min = beta_min, beta_max, t_min

    def marginal(self, t):
        log_alpha = -0.25 * t ** 2 * (self.b1 - self.b0) - 0.5 * t * self.b0
        return log_alpha.exp(), (1 - (2 * log_alpha).exp()).clamp(min=1e-12).sqrt()

    def coefficients(self, t):
        beta = self.b0 + t * (self.b1 - self.b0)
        return -0.5 * beta, beta


class VESDE(SDE):
    """Variance exploding: σ_t = σ_min (σ_max/σ_min)^t, g(t)² = dσ_t²/dt."""

    def __init__(self, sigma_min: float, sigma_max: float, t_min: float = 1e-5):
        self.s0, self.s1, self.t_min = sigma_min, sigma_max, t_min

    def marginal(self, t):
        return torch.ones_like(t), self.s0 * (self.s1 / self.s0) ** t

    def coefficients(self, t):
        sigma = self.s0 * (self.s1 / self.s0) ** t
        return torch.zeros_like(t), 2 * sigma ** 2 * math.log(self.s1 / self.s0)

    def c_in(self, t):
        return 1 / (1 + self.marginal(t)[1] ** 2).sqrt()

    def prior_std(self):
        return self.s1


def sde_of(schedule) -> SDE:
    """Return the SDE of a ScoreSdeVp/VeScheduler's configuration."""
    cfg = schedule.config
    if isinstance(schedule, ScoreSdeVpScheduler):
        return VPSDE(cfg.beta_min, cfg.beta_max, cfg.sampling_eps)
    return VESDE(cfg.sigma_min, cfg.sigma_max, cfg.sampling_eps)


def _col(v: torch.Tensor) -> torch.Tensor:
    """Return a per-sample (B,) or scalar tensor shaped to broadcast over (B, C, h, w)."""
    return v.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------- training


def training_loss(schedule, denoise: Denoiser, latents: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Return the objective's regression loss on latents (B, C, h, w) at random times (ε or v MSE)."""
    objective = objective_of(schedule)
    if objective == "ddpm":
        return diffusion_loss(denoise, schedule, latents, states, mask, generator)
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    u = torch.rand(b, generator=generator).to(device)  # (B,)
    if objective == "flow":
        x_t = (1 - _col(u)) * latents + _col(u) * noise
        return (denoise(x_t, TIME_SCALE * u, states, mask) - (noise - latents)).pow(2).mean()
    sde = sde_of(schedule)
    t = sde.t_min + (1 - sde.t_min) * u
    alpha, sigma = sde.marginal(t)
    x_t = _col(alpha) * latents + _col(sigma) * noise
    return (denoise(_col(sde.c_in(t)) * x_t, TIME_SCALE * t, states, mask) - noise).pow(2).mean()


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample_latents(schedule, sampler: str | None, denoise: Denoiser, noise: torch.Tensor,
                   cond: tuple[torch.Tensor, torch.Tensor], uncond: tuple[torch.Tensor, torch.Tensor], steps: int,
                   guidance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return x_0 (B, C, h, w) sampled from unit Gaussian `noise` in `steps` steps with classifier-free guidance.

    The one sampling entry point of every objective; `sampler` None picks the
    objective's default. Stochastic samplers (ddpm, em, pc) draw from `generator`.
    """
    objective = objective_of(schedule)
    sampler = resolve_sampler(objective, sampler)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(denoise, x, t, cond, uncond, guidance)

    if objective == "ddpm":
        return sample(denoise, make_sampler(schedule, sampler), noise, cond, uncond, steps, guidance, generator)
    if objective == "flow":
        return sample_flow(model, noise, steps, sampler)
    return sample_sde(model, sde_of(schedule), noise, steps, sampler, generator)


def sample_flow(velocity, noise: torch.Tensor, steps: int, sampler: str) -> torch.Tensor:
    """Return x_0 integrated from x_1 = noise along dx/dt = velocity(x, 1000 t) on t_i = 1 − i/steps.

    Euler is diffusers' FlowMatchEulerDiscreteScheduler given these sigmas; Heun
    (trapezoid predictor–corrector, not on the last step to t = 0) is ours.
    """
    ts = [1 - i / steps for i in range(steps + 1)]
    x = noise
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(sigmas=ts[:-1], device=noise.device)
        for t in scheduler.timesteps:
            x = scheduler.step(velocity(x, t), t, x).prev_sample
        return x
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, torch.tensor(TIME_SCALE * t, device=x.device))
        x_euler = x + (t_next - t) * v
        if t_next == 0:
            return x_euler
        v_next = velocity(x_euler, torch.tensor(TIME_SCALE * t_next, device=x.device))
        x = x + (t_next - t) * 0.5 * (v + v_next)
    return x


def sample_sde(model, sde: SDE, noise: torch.Tensor, steps: int, sampler: str,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Return x_0 from x_1 = prior_std · noise by the reverse SDE (`em`), predictor–corrector (`pc`) or the
    probability-flow ODE (`ode`, Heun), ending with the denoised mean at the last grid time."""
    device = noise.device
    ts = [1 - i * (1 - sde.t_min) / max(1, steps - 1) for i in range(steps)] if steps > 1 else [1.0]

    def eps_at(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.tensor(t, device=device)
        return model(_col(sde.c_in(tt)) * x, TIME_SCALE * tt)

    def ode_drift(x: torch.Tensor, t: float, eps: torch.Tensor) -> torch.Tensor:
        # dx/dt = f x − ½ g² ∇log p = f x + ½ g² ε / σ
        f, g2 = sde.coefficients(torch.tensor(t, device=device))
        return f * x + 0.5 * g2 * eps / sde.marginal(torch.tensor(t, device=device))[1]

    def randn(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator).to(device)

    x = noise * sde.prior_std()
    for i, t in enumerate(ts):
        eps = eps_at(x, t)
        if i == len(ts) - 1:  # last: the denoised mean E[x0 | x_t] = (x − σ ε) / α
            alpha, sigma = sde.marginal(torch.tensor(t, device=device))
            return (x - sigma * eps) / alpha
        dt = ts[i + 1] - t  # < 0
        if sampler == "ode":  # Heun on the probability-flow ODE
            d = ode_drift(x, t, eps)
            x_pred = x + dt * d
            x = x + dt * 0.5 * (d + ode_drift(x_pred, ts[i + 1], eps_at(x_pred, ts[i + 1])))
            continue
        # Euler–Maruyama on the reverse SDE dx = [f x − g² ∇log p] dt + g dW̄:  ∇log p = −ε/σ
        f, g2 = sde.coefficients(torch.tensor(t, device=device))
        sigma = sde.marginal(torch.tensor(t, device=device))[1]
        x = x + (f * x + g2 * eps / sigma) * dt + (g2 * -dt).sqrt() * randn(x)
        if sampler == "pc":  # one Langevin corrector step at t_{i+1} (Song et al. 2021, Algorithms 4-5)
            # step 2 α_i (r ‖z‖ / ‖∇log p‖)² with both norms at their expectations √d and √d / σ: the same step
            # for every sample (measured norms make it depend on the sample itself, which biases it outward)
            t_next = torch.tensor(ts[i + 1], device=device)
            alpha_next, sigma_next = sde.marginal(t_next)
            score = -eps_at(x, ts[i + 1]) / sigma_next
            keep = (alpha_next / sde.marginal(torch.tensor(t, device=device))[0]) ** 2  # VP: α_i = 1 − β_i
            step = 2 * keep * (CORRECTOR_SNR * sigma_next) ** 2
            x = x + step * score + (2 * step).sqrt() * randn(x)
    return x


def count_nfe(schedule, sampler: str | None, steps: int) -> int:
    """Return the network evaluations (guided; a CFG pair counts once) the sampler spends in `steps` steps."""
    calls = []

    def counting(x, t, states, mask):
        calls.append(1)
        return torch.zeros_like(x)

    one = (torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))
    sample_latents(schedule, sampler, counting, torch.zeros(1, 1, 1, 1), one, one, steps, 1.0,
                   torch.Generator().manual_seed(0))
    return len(calls)
