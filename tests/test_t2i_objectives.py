"""Tests of the t2i objectives, samplers and DiT backbone: known answers on a Gaussian toy whose exact
ε/velocity is known, adaLN-Zero identity at initialisation, and every objective × backbone trained under
`smoke` through the runner (deterministic samples, loadable model, quality-vs-NFE picture), one of them as a
loopback Slurm job equal to the local run, and a short run beating the untrained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import test_slurm
from multimodal.dit import DiT, DiTBlock
from multimodal.objectives import (SAMPLERS, count_nfe, make_schedule, objective_of, resolve_sampler, sample_latents,
                                   sde_of, training_loss)

torch.set_num_threads(1)
slurm_cluster = test_slurm.slurm_cluster  # the fixtures of the loopback cluster (skips when it is down)
stdin_from_devnull = test_slurm.stdin_from_devnull  # autouse: NeMo-Run's sbatch reads stdin

MU, S = 0.7, 0.4  # toy data: every latent coordinate ~ N(MU, S²) independently


def toy_model(schedule):
    """Return the exact denoiser (ε for the SDEs, v for flow) of N(MU, S²) data under `schedule`; the prompt
    state does not matter."""
    objective = objective_of(schedule)

    def denoise(x, tt, states, mask):
        t = (tt.double() / 1000).reshape(-1, 1, 1, 1)
        x = x.double()
        if objective == "flow":
            var = (1 - t) ** 2 * S ** 2 + t ** 2
            d = x - (1 - t) * MU
            return (t * d / var - (MU + (1 - t) * S ** 2 * d / var)).float()
        sde = sde_of(schedule)
        alpha, sigma = (v.double() for v in sde.marginal(t.float()))
        x = x / sde.c_in(t.float()).double()  # the network sees c_in · x_t
        return (sigma * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)).float()

    return denoise


NULL = (torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))


def toy_samples(objective, sampler, steps, n=500, seed=0):
    schedule = make_schedule(objective)
    # 16 coordinates per sample: the Langevin corrector sizes its step by per-sample norms (degenerate in 1-D)
    noise = torch.randn(n, 16, 1, 1, generator=torch.Generator().manual_seed(seed))
    cond = (NULL[0].expand(n, 1, 1), NULL[1].expand(n, 1))
    x = sample_latents(schedule, sampler, toy_model(schedule), noise, cond, cond, steps, 1.0,
                       torch.Generator().manual_seed(seed + 1))
    return float(x.mean()), float(x.std())


@pytest.mark.parametrize("objective,sampler,steps,tol", [
    ("vp_sde", "ode", 40, 0.02), ("ve_sde", "ode", 60, 0.03), ("flow", "euler", 100, 0.02), ("flow", "heun", 20, 0.01),
    ("vp_sde", "em", 200, 0.04), ("vp_sde", "pc", 200, 0.04), ("ve_sde", "em", 300, 0.05), ("ve_sde", "pc", 300, 0.05),
])
def test_samplers_with_the_exact_model_draw_the_data_distribution(objective, sampler, steps, tol):
    # the probability-flow ODE, the reverse SDE (Euler–Maruyama, predictor–corrector) and the flow-matching ODE,
    # each given the exact ε / velocity of N(MU, S²) data, return samples with that mean and standard deviation
    mean, std = toy_samples(objective, sampler, steps)
    assert mean == pytest.approx(MU, abs=tol) and std == pytest.approx(S, abs=tol), (mean, std)


def test_flow_euler_with_one_step_is_the_straight_line_and_heun_beats_euler():
    # one Euler step of rectified flow lands on x1 − v(x1, 1) = E[x0 | x1] = MU for this toy: every sample equal
    mean, std = toy_samples("flow", "euler", 1)
    assert mean == pytest.approx(MU, abs=1e-5) and std < 1e-5
    err = {s: abs(toy_samples("flow", s, 4)[1] - S) for s in ("euler", "heun")}
    assert err["heun"] < err["euler"], err


def test_training_loss_is_zero_only_for_the_exact_model_and_nfe_is_counted():
    gen = torch.Generator().manual_seed(0)
    latents = MU + S * torch.randn(512, 1, 1, 1, generator=gen)
    states, mask = NULL[0].expand(512, 1, 1), NULL[1].expand(512, 1)
    for objective in ("vp_sde", "ve_sde", "flow"):
        schedule = make_schedule(objective)
        exact = training_loss(schedule, toy_model(schedule), latents, states, mask, torch.Generator().manual_seed(1))
        zero = training_loss(schedule, lambda x, t, s, m: torch.zeros_like(x), latents, states, mask,
                             torch.Generator().manual_seed(1))
        # the exact model leaves only the irreducible variance of the target; it is far below predicting zero
        assert float(exact) < 0.8 * float(zero), (objective, float(exact), float(zero))
    assert {s: count_nfe(make_schedule("flow"), s, 4) for s in ("euler", "heun")} == {"euler": 4, "heun": 7}
    assert {s: count_nfe(make_schedule("vp_sde"), s, 4) for s in ("em", "pc", "ode")} == {"em": 4, "pc": 7, "ode": 7}
    assert count_nfe(make_schedule("ddpm"), "dpm", 4) == 4 and count_nfe(make_schedule("ddpm"), "ddim", 1) == 1
    assert resolve_sampler("flow", None) in SAMPLERS["flow"]
    with pytest.raises(ValueError, match="samples with"):
        resolve_sampler("flow", "ddim")


def test_dit_adaln_zero_starts_as_identity_and_round_trips():
    torch.manual_seed(0)
    block = DiTBlock(32, 4, 16)
    x, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    text, mask = torch.randn(3, 5, 16), torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] + [False] * 4])
    assert torch.equal(block(x, c, text, mask), x)  # every gate starts at zero
    dit = DiT(sample_size=8, in_channels=4, patch_size=2, width=32, depth=2, heads=4, text_dim=16)
    z = torch.randn(3, 4, 8, 8)
    assert torch.equal(dit(z, torch.tensor(500), text, mask), torch.zeros_like(z))  # zero output layer
    with torch.no_grad():  # perturbed: patchify and unpatchify are inverse (a pixel moves only its own patch)
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = dit(z, torch.tensor([1, 500, 999]), text, mask)
    assert out.shape == z.shape and torch.isfinite(out).all()
    z2 = z.clone()
    z2[:, :, 0, 0] += 1.0
    first_patch = (dit(z2, torch.tensor([1, 500, 999]), text, mask) - out).abs()
    assert first_patch.sum() > 0 and first_patch.amax(dim=(0, 1))[4:, 4:].sum() > 0  # attention mixes patches


# ---------------------------------------------------------------- through the stage


COMBOS = [("ddpm", "dit"), ("vp_sde", "unet"), ("ve_sde", "unet"), ("flow", "dit")]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Run t2i_data -> t2i_vae -> t2i_train under `smoke` for each objective × backbone in COMBOS, in this
    process (the data and VAE stages once, copied); return {combo: run dir}."""
    import shutil

    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    root = tmp_path_factory.mktemp("t2i_objectives")
    runs = {}
    for objective, backbone in COMBOS:
        run_dir = root / f"{objective}-{backbone}"
        if runs:
            for stage in ("t2i_data", "t2i_vae"):
                shutil.copytree(next(iter(runs.values())) / stage, run_dir / stage)
        configs = configs_to_json(resolve_configs("smoke", combo_overrides(objective, backbone)))
        for name in ("t2i_data", "t2i_vae", "t2i_train"):
            assert execute_stage(str(run_dir), name, configs)["status"] == "completed", (objective, name)
        runs[(objective, backbone)] = run_dir
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_objective_and_backbone_train_and_sample_deterministically(smoke_runs, combo):
    from PIL import Image

    from multimodal.t2i_model import T2IModel

    run = smoke_runs[combo]
    m = json.loads((run / "t2i_train" / "manifest.json").read_text())
    assert m["metrics"]["objective"] == combo[0] and m["metrics"]["backbone"] == combo[1]
    assert {"quality_vs_nfe", "quality"} <= set(m["outputs"])
    curve = json.loads((run / "t2i_train" / "quality.json").read_text())["steps_curve"]
    assert [p["steps"] for p in curve] == [1, 2, 3] and all(p["nfe"] >= p["steps"] for p in curve)
    assert Image.open(run / "t2i_train" / "quality_vs_nfe.png").size[0] > 200
    model = T2IModel.load(run / "t2i_vae" / "vae", run / "t2i_train")
    assert objective_of(model.scheduler) == combo[0] and type(model.unet).__name__ == {"dit": "DiT"}.get(
        combo[1], "UNet2DConditionModel")
    for sampler in SAMPLERS[combo[0]]:
        a = model.generate(["a red circle", "a handwritten three"], [3, 4], 2, 3.0, sampler)
        b = model.generate(["a red circle", "a handwritten three"], [3, 4], 2, 3.0, sampler)
        assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all() and np.array_equal(a, b), sampler


@pytest.mark.slow
def test_default_objective_stays_ddpm_unet_for_readers_of_the_first_format(smoke_runs):
    # the first t2i format (DDPM + UNet: unet/, scheduler/ as DDPMScheduler) is still what the default writes
    from pipeline.presets import resolve_configs

    cfg = resolve_configs("tiny")["t2i_train"]
    assert (cfg.objective, cfg.backbone) == ("ddpm", "unet")
    from diffusers import FlowMatchEulerDiscreteScheduler

    run = smoke_runs[("flow", "dit")]
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(run / "t2i_train" / "scheduler").config.shift == 1.0


@pytest.mark.slow
def test_a_short_flow_dit_run_beats_the_untrained_model(smoke_runs, tmp_path):
    # flow matching on the DiT, a few hundred steps on the smoke caption set (the fixture's data, a VAE trained a
    # little longer): guided samples are judged far better than the untrained model's (zero velocity: decoded noise)
    import shutil

    from multimodal.t2i_data import read_caption_set
    from multimodal.t2i_judge import build_judge
    from multimodal.t2i_model import T2IModel
    from multimodal.t2i_train import judge_setting
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_runs[COMBOS[0]] / "t2i_data", run_dir / "t2i_data")
    configs = configs_to_json(resolve_configs("smoke", [
        "t2i_vae.steps=150", "t2i_train.objective=flow", "t2i_train.backbone=dit", "t2i_train.dit_width=64",
        "t2i_train.batch_size=32", "t2i_train.epochs=10", "t2i_train.eval_per_prompt=5", "t2i_train.steps_curve=4",
        "t2i_train.sample_steps=8", "t2i_train.guidance_scales=3"]))
    for name in ("t2i_vae", "t2i_train"):
        assert execute_stage(str(run_dir), name, configs)["status"] == "completed", name
    metrics = json.loads((run_dir / "t2i_train" / "manifest.json").read_text())["metrics"]
    model = T2IModel.load(run_dir / "t2i_vae" / "vae", run_dir / "t2i_train")
    for p in model.unet.parameters():  # back to the untrained (zero-initialised output) DiT
        torch.nn.init.zeros_(p)
    judge = build_judge(read_caption_set(run_dir / "t2i_data"), 5, 0)
    untrained = judge_setting(model, judge, 5, 8, 3.0, "heun")
    assert metrics["digit_accuracy_g3"] > 0.3 and metrics["digit_accuracy_g3"] > untrained["digit_accuracy"] + 0.15, (
        metrics, untrained)
    assert metrics["fid_like_g3"] < 0.8 * untrained["fid_like"], (metrics["fid_like_g3"], untrained["fid_like"])


def combo_overrides(objective: str, backbone: str) -> list[str]:
    """Return the key=value overrides selecting an objective and a backbone."""
    return [f"t2i_train.objective={objective}", f"t2i_train.backbone={backbone}"]


@pytest.mark.slow
def test_cli_samples_with_the_trained_objectives_samplers(smoke_runs, tmp_path, capsys):
    from PIL import Image

    from multimodal.cli import t2i_main

    run = smoke_runs[("flow", "dit")]
    out = tmp_path / "circle.png"
    assert t2i_main(["sample", "a red circle", "--run-dir", str(run), "--steps", "2", "--num", "2",
                     "--sampler", "euler", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 2 * 16 and "flow, euler, 2 steps" in capsys.readouterr().out
    assert t2i_main(["sample", "a red circle", "--run-dir", str(run), "--sampler", "ddim"]) == 2
    assert "samples with euler, heun, not 'ddim'" in capsys.readouterr().err


@pytest.mark.slurm
@pytest.mark.slow
def test_flow_dit_on_slurm_matches_the_local_run(slurm_cluster, smoke_runs, tmp_path):
    # t2i_data -> t2i_vae -> t2i_train (flow matching, DiT) as loopback Slurm jobs: the same fingerprints, outputs
    # (weights, pictures: sha256) and metrics as the in-process run of the same smoke configs (the fixture's)
    from pipeline import jobs
    from pipeline.clusters import parse_profile
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs

    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:20:00"})
    names = ["t2i_data", "t2i_vae", "t2i_train"]
    slurm = tmp_path / "slurm"
    states = run_stages(slurm, resolve_configs("smoke", combo_overrides("flow", "dit")), names, executor="slurm",
                        profile=profile)
    records = jobs.read_records(slurm)
    assert set(states.values()) == {"completed"}, {n: jobs.stage_logs(records[n])[-2000:] for n in records}
    for name in names:
        local = test_slurm.read_manifest(smoke_runs[("flow", "dit")], name)
        assert test_slurm.untimed(test_slurm.read_manifest(slurm, name)) == test_slurm.untimed(local), name
        assert records[name].executor == "slurm"
