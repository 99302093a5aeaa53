"""Tests of the consistency models of the t2i latent model (multimodal/consistency.py): the boundary condition
f(y, σ_min) = y of the skip/out parametrisation for any network, multistep consistency sampling and the
distillation target on a Gaussian toy whose exact consistency function is known, improved CT's schedule, the
stage in both modes under `smoke` through the runner (deterministic, batch-independent samples; the CLI), one
run as a loopback Slurm job equal to the local run, and a short distillation beating its starting point."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import test_slurm
from multimodal.consistency import (ConsistencyFunction, ConsistencyModel, consistency_sample, ct_intervals,
                                    karras_sigmas, lognormal_index_probs, pseudo_huber, teacher_log_sigmas,
                                    teacher_ode_step, teacher_timestep)
from multimodal.diffusion import build_unet, make_train_scheduler
from multimodal.dit import DiT
from test_slurm import read_manifest, untimed

torch.set_num_threads(1)
slurm_cluster = test_slurm.slurm_cluster  # the fixtures of the loopback cluster (skips when it is down)
stdin_from_devnull = test_slurm.stdin_from_devnull  # autouse: NeMo-Run's sbatch reads stdin

MU, S = 0.7, 0.4  # toy data: every latent coordinate ~ N(MU, S²) independently


def cm_schedule(mode: str, sigma_min: float, intervals: int = 20):
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(num_train_timesteps=intervals + 1, sigma_min=sigma_min, sigma_max=80.0,
                                          sigma_data=1.0, rho=7.0, clip_denoised=False)


def exact_f(y: torch.Tensor, sigma: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """The exact consistency function of N(MU, S²) data: along the probability-flow ODE y − MU scales as
    √(S² + σ²), so y at σ goes to MU + (y − MU)·√(S² + σ_min²)/√(S² + σ²) at σ_min."""
    s = sigma.double().reshape(-1, 1, 1, 1)
    return (MU + (y.double() - MU) * math.sqrt(S ** 2 + sigma_min ** 2) / (S ** 2 + s ** 2).sqrt()).float()


class ExactCT(torch.nn.Module):
    """A 'network' of train mode whose consistency function is exact_f: F = (f* − c_skip y) / c_out from its
    input c_in·y and timestep 250 ln σ."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x_in, t, states, mask):
        sigma = (t.double() / 250.0).exp().float()
        s = sigma.reshape(-1, 1, 1, 1)
        y = x_in * (s ** 2 + 1.0).sqrt()
        c_skip, c_out = self.schedule.get_scalings_for_boundary_condition(s)
        return (exact_f(y, sigma, self.schedule.config.sigma_min) - c_skip * y) / c_out


def toy_text(n: int):
    return torch.zeros(n, 1, 1), torch.ones(n, 1, dtype=torch.bool)


def test_the_boundary_condition_holds_exactly_for_any_network():
    # f(y, σ_min) = c_skip y + c_out F with c_skip(σ_min) = 1, c_out(σ_min) = 0: y itself, whatever F is (random
    # UNet and DiT, both modes); above σ_min the network matters
    teacher = make_train_scheduler(1000, "squaredcos_cap_v2")
    log_sigmas = teacher_log_sigmas(teacher)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4, 4, 4, generator=gen) * 2
    states, mask = torch.randn(3, 5, 8, generator=gen), torch.ones(3, 5, dtype=torch.bool)
    nets = {"unet": build_unet(4, 4, (8, 16), 8, True), "dit": DiT(sample_size=4, in_channels=4, patch_size=2,
                                                                     width=16, depth=1, heads=2, text_dim=8)}
    for p in nets["dit"].parameters():  # off adaLN-Zero's zero start, so F ≠ 0
        torch.nn.init.normal_(p, std=0.2, generator=gen)
    for name, net in nets.items():
        for mode, sigma_min in (("distill", float(log_sigmas[0].exp())), ("train", 0.002)):
            f = ConsistencyFunction(net.eval(), cm_schedule(mode, sigma_min), mode, log_sigmas)
            with torch.no_grad():
                at_min = f(y, torch.full((3,), sigma_min), states, mask)
                above = f(y, torch.full((3,), 2.0), states, mask)
                assert f.raw(y, torch.full((3,), sigma_min), states, mask).abs().sum() > 0, (name, mode)
            assert torch.equal(at_min, y), (name, mode)
            assert not torch.allclose(above, y), (name, mode)


def test_distilled_student_starts_as_the_teachers_x0_estimate():
    # distill: F is the EDM output of the ε network, so f = y − σ ε away from σ_min, at the teacher's timestep of σ
    teacher = make_train_scheduler(1000, "squaredcos_cap_v2")
    log_sigmas = teacher_log_sigmas(teacher)
    ts = torch.tensor([0.0, 10.0, 500.0, 990.0])
    assert torch.allclose(teacher_timestep(log_sigmas, log_sigmas[ts.long()].exp().float()), ts, atol=1e-3)
    eps_net = lambda x, t, states, mask: torch.sin(3 * x) + t.reshape(-1, 1, 1, 1) / 1000  # noqa: E731
    f = ConsistencyFunction(eps_net, cm_schedule("distill", float(log_sigmas[0].exp())), "distill", log_sigmas)
    y = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor([1.0, 5.0, 20.0, 80.0])
    x0 = y - sigma.reshape(-1, 1, 1, 1) * eps_net(y / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(),
                                                  teacher_timestep(log_sigmas, sigma), None, None)
    got = f(y, sigma, None, None)
    err = (got - x0).flatten(1).abs().amax(1) / x0.flatten(1).abs().amax(1)
    assert (err < torch.tensor([0.01, 2e-3, 5e-4, 1e-4])).all(), err  # c_skip, c_out → EDM's as σ ≫ σ_min


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampling_with_the_exact_function_draws_the_data_distribution(steps):
    schedule = cm_schedule("train", 0.002)
    f = ConsistencyFunction(ExactCT(schedule), schedule, "train")
    n = 1000
    x = consistency_sample(f, *toy_text(n), list(range(n)), steps, (4, 1, 1))
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) - S) < 0.02, (float(x.mean()), float(x.std()))
    # every image draws its noise from its own seed: the same in any batch
    alone = consistency_sample(f, *toy_text(1), [7], steps, (4, 1, 1))
    assert torch.allclose(alone[0], x[7], atol=1e-6)


def test_distillation_target_of_the_exact_teacher_matches_the_exact_function():
    # a teacher with the exact ε of N(MU, S²) data: one ODE step from σ_{n+1} to σ_n keeps f* (the CD loss of the
    # exact consistency function vanishes up to the solver's error; Heun's is far smaller than DDIM's)
    scheduler = make_train_scheduler(1000, "squaredcos_cap_v2")
    log_sigmas = teacher_log_sigmas(scheduler)

    def exact_eps(x, t, states, mask):
        i = t.double().clamp(0, 999)
        lo = i.floor().long().clamp(max=998)
        sigma = (log_sigmas[lo] + (i - lo) * (log_sigmas[lo + 1] - log_sigmas[lo])).exp().reshape(-1, 1, 1, 1)
        y = x.double() * (1 + sigma ** 2).sqrt()
        return (sigma * (y - MU) / (S ** 2 + sigma ** 2)).float()

    teacher = SimpleNamespace(denoiser=lambda: exact_eps)
    sigma_min = float(log_sigmas[0].exp())
    grid = karras_sigmas(cm_schedule("distill", sigma_min), 40).float()
    n = torch.arange(0, 40, 3)
    hi, lo = grid[n], grid[n + 1]
    gen = torch.Generator().manual_seed(0)
    y = MU + S * torch.randn(len(n), 4, 1, 1, generator=gen) + hi.reshape(-1, 1, 1, 1) * torch.randn(
        len(n), 4, 1, 1, generator=gen)
    errors = {}
    for solver in ("ddim", "heun"):
        y_lo = teacher_ode_step(teacher, log_sigmas, y, hi, lo, toy_text(len(n)), toy_text(len(n)), 3.0, solver)
        errors[solver] = float((exact_f(y_lo, lo, sigma_min) - exact_f(y, hi, sigma_min)).abs().max())
    assert errors["heun"] < 2e-3 and errors["heun"] < 0.2 * errors["ddim"] and errors["ddim"] < 0.1, errors


def test_improved_ct_schedule_and_loss():
    assert [ct_intervals(s, 400, 10, 160) for s in (0, 79, 80, 399)] == [10, 10, 20, 160]
    assert ct_intervals(10_000, 400, 10, 160) == 160
    schedule = cm_schedule("train", 0.002)
    sigmas = karras_sigmas(schedule, 10)
    assert len(sigmas) == 11 and math.isclose(sigmas[0], 80.0, rel_tol=1e-6) and math.isclose(sigmas[-1], 0.002,
                                                                                           rel_tol=1e-5)
    assert (sigmas[:-1] > sigmas[1:]).all()
    p = lognormal_index_probs(sigmas, -0.4, 2.0)
    assert p.shape == (10,) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-9)
    assert int(p.argmax()) in range(4, 8)  # the intervals round e^{-0.4} ≈ 0.67 carry the most weight
    a, b = torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 0.5)
    assert torch.allclose(pseudo_huber(a, b, 0.0), torch.full((2,), math.sqrt(12 * 0.25)))
    assert torch.allclose(pseudo_huber(a, a + 0.01, 1.0), torch.full((2,), 12e-4 / 2), rtol=2e-3)  # ≈ ‖Δ‖²/2c


# ---------------------------------------------------------------- through the stage


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Run t2i_data -> t2i_vae -> t2i_train -> t2i_consistency under `smoke`, in this process, in each mode (the
    upstream stages once, copied); return {mode: run dir}."""
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    root = tmp_path_factory.mktemp("consistency")
    runs = {}
    for mode in ("distill", "train"):
        run_dir = root / mode
        if runs:
            for stage in ("t2i_data", "t2i_vae", "t2i_train"):
                shutil.copytree(runs["distill"] / stage, run_dir / stage)
        configs = configs_to_json(resolve_configs("smoke", [f"t2i_consistency.mode={mode}"]))
        for name in ("t2i_data", "t2i_vae", "t2i_train", "t2i_consistency"):
            assert execute_stage(str(run_dir), name, configs)["status"] == "completed", (mode, name)
        runs[mode] = run_dir
    return runs


@pytest.mark.parametrize("mode", ["distill", "train"])
def test_stage_trains_and_samples_deterministically_in_both_modes(smoke_runs, mode):
    from PIL import Image

    run = smoke_runs[mode]
    m = read_manifest(run, "t2i_consistency")
    metrics = m["metrics"]
    assert metrics["mode"] == mode and metrics["steps"] == 4 and not (run / "t2i_consistency" / "checkpoints").exists()
    for key in ("digit_accuracy", "shape_accuracy", "fid_like", "images_per_s"):
        assert {f"cm_{n}step_{key}" for n in (1, 2, 4)} | {f"teacher_ddim{n}_{key}" for n in (1, 2, 4)} | {
            f"teacher_default_{key}"} <= set(metrics), key
    assert metrics["teacher_default_steps"] == 3  # the smoke t2i_train's sample_steps
    quality = json.loads((run / "t2i_consistency" / "quality.json").read_text())
    assert [(r["model"], r["steps"]) for r in quality["rows"]] == [(f"cm_{mode}", n) for n in (1, 2, 4)] + [
        ("teacher", n) for n in (1, 2, 4)] + [("teacher", 3)]
    for n in (1, 2, 4):
        assert Image.open(run / "t2i_consistency" / m["outputs"][f"samples_{n}step"]["path"]).size[0] > 6 * 16
    model = ConsistencyModel.load(run / "t2i_vae" / "vae", run / "t2i_consistency")
    assert model.f.mode == mode and (model.f.log_sigmas is not None) == (mode == "distill")
    prompts = ["a red circle", "a handwritten three", "a blue square"]
    for steps in (1, 2, 4):
        a = model.generate(prompts, [3, 4, 5], steps)
        assert a.shape == (3, 16, 16, 3) and np.isfinite(a).all()
        assert np.array_equal(a, model.generate(prompts, [3, 4, 5], steps))
        assert not np.array_equal(a, model.generate(prompts, [6, 4, 5], steps))
        assert np.allclose(a[1], model.generate(prompts[1:2], [4], steps)[0], atol=1e-5)  # batch-independent


def test_cli_samples_the_consistency_model(smoke_runs, tmp_path, capsys):
    from PIL import Image

    from multimodal.cli import t2i_main

    png = tmp_path / "cm.png"
    assert t2i_main(["sample", "a handwritten seven", "--consistency", "--steps", "2", "--num", "3",
                     "--run-dir", str(smoke_runs["distill"]), "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 3 * 16 and "2 steps" in capsys.readouterr().out
    assert t2i_main(["sample", "a red circle", "--consistency", "--run-dir", str(tmp_path)]) == 2
    assert "aigc t2i consistency" in capsys.readouterr().err


@pytest.mark.slurm
@pytest.mark.slow
def test_consistency_stage_on_slurm_matches_the_local_run(slurm_cluster, smoke_runs, tmp_path):
    # t2i_consistency (distill, smoke) as a loopback Slurm job on the upstream stages of the local run: the same
    # fingerprint, outputs (weights, grids: sha256) and metrics (durations and rates aside) as the in-process run
    from pipeline import jobs
    from pipeline.clusters import parse_profile
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs

    local = smoke_runs["distill"]
    slurm = tmp_path / "slurm"
    for stage in ("t2i_data", "t2i_vae", "t2i_train"):
        shutil.copytree(local / stage, slurm / stage)
    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:20:00"})
    states = run_stages(slurm, resolve_configs("smoke", ["t2i_consistency.mode=distill"]), ["t2i_consistency"],
                        executor="slurm", profile=profile)
    records = jobs.read_records(slurm)
    assert states == {"t2i_consistency": "completed"}, {n: jobs.stage_logs(records[n])[-2000:] for n in records}
    assert records["t2i_consistency"].executor == "slurm"
    assert untimed(read_manifest(slurm, "t2i_consistency")) == untimed(read_manifest(local, "t2i_consistency"))


@pytest.mark.slow
def test_a_short_distillation_beats_its_start_at_one_step(smoke_runs, tmp_path):
    # the trivial baseline of CD is where it starts, the teacher's one-step estimate (its DDIM in one step from
    # σ_max): after a short distillation (the smoke teacher, 60 steps) the one-step student lands closer to the end of
    # the teacher's guided probability-flow ODE (its DDIM in 25 steps, the same starting noise) than that estimate
    from multimodal.consistency import make_schedule, teacher_ddim
    from multimodal.t2i_model import T2IModel
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    run = tmp_path / "run"
    for stage in ("t2i_data", "t2i_vae", "t2i_train"):
        shutil.copytree(smoke_runs["distill"] / stage, run / stage)
    overrides = ["t2i_consistency.steps=60", "t2i_consistency.batch_size=32", "t2i_consistency.intervals=25",
                 "t2i_consistency.lr=5e-4", "t2i_consistency.sample_steps=1", "t2i_consistency.checkpoint_every=60"]
    configs = resolve_configs("smoke", overrides)
    assert execute_stage(str(run), "t2i_consistency", configs_to_json(configs))["status"] == "completed"
    teacher = T2IModel.load(run / "t2i_vae" / "vae", run / "t2i_train")
    student = ConsistencyModel.load(run / "t2i_vae" / "vae", run / "t2i_consistency")
    grid = make_schedule(configs["t2i_consistency"], teacher.scheduler)
    prompts = ["a handwritten three", "a red circle", "a blue triangle", "a handwritten seven"] * 4
    seeds = list(range(100, 116))
    ode_end = teacher_ddim(teacher, grid, prompts, seeds, 25, 3.0)
    before = float(((teacher_ddim(teacher, grid, prompts, seeds, 1, 3.0) - ode_end) ** 2).mean())
    after = float(((student.generate(prompts, seeds, 1) - ode_end) ** 2).mean())
    assert after < 0.8 * before, (after, before)
