"""Tests of 3D Gaussian splatting (`nerf_gsplat`, multimodal/gsplat_render.py and gsplat_train.py).

The rasterizer against closed forms (one isotropic Gaussian's footprint and mass,
SH colours), its gradients by finite differences in float64, densification and
pruning on a hand-made cloud; the stage under `smoke` through the runner
(deterministic, resumes after a kill, the same on the loopback Slurm cluster) and,
slow, a short real fit that beats the mean-colour image.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import test_slurm
from test_slurm import read_manifest, untimed

torch.set_num_threads(1)
slurm_cluster = test_slurm.slurm_cluster  # the fixtures of the loopback cluster (skips when it is down)
stdin_from_devnull = test_slurm.stdin_from_devnull  # autouse: NeMo-Run's sbatch reads stdin


class Killed(Exception):
    pass


def execute(run_dir, names: list[str], overrides: list[str] | None = None, preset: str = "smoke") -> dict:
    """Run `names` through the runner in this process; return name -> result."""
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    configs = configs_to_json(resolve_configs(preset, overrides or []))
    return {n: execute_stage(str(run_dir), n, configs) for n in names}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """nerf_data -> nerf_gsplat under `smoke` through the runner; return the run dir."""
    run_dir = tmp_path_factory.mktemp("gsplat")
    assert {r["status"] for r in execute(run_dir, ["nerf_data", "nerf_gsplat"]).values()} == {"completed"}
    return run_dir


def one_gaussian(opacity: float, scale: float, depth: float, sh_degree: int = 0):
    """Return a cloud of one isotropic white Gaussian on the optical axis of the identity camera at `depth`."""
    from multimodal.gsplat_render import GaussianCloud, rgb_to_sh

    cloud = GaussianCloud(1, sh_degree)
    cloud.set_tensors({"means": torch.tensor([[0.0, 0.0, -depth]]), "log_scales": torch.full((1, 3), math.log(scale)),
                       "quats": torch.tensor([[0.3, -0.5, 0.2, 0.7]]),  # any rotation: isotropic
                       "opacity_logits": torch.tensor([math.log(opacity / (1 - opacity))]),
                       "sh_dc": rgb_to_sh(torch.ones(1, 1, 3)), "sh_rest": torch.zeros(1, (sh_degree + 1) ** 2 - 1, 3)})
    return cloud


def test_one_isotropic_gaussian_renders_its_closed_form_footprint():
    # An isotropic Gaussian of std s at depth z on the axis projects to std σ' = sqrt((f s / z)² + 0.3) px about
    # the image centre; each pixel is o·exp(−r²/2σ'²) where that is ≥ 1/255 (white on black), and the image's
    # mass is ≈ o·2πσ'² (the tail under 1/255 is cut off)
    from multimodal.gsplat_render import render

    size, focal, o, s, z = 32, 40.0, 0.3, 0.25, 5.0
    out = render(one_gaussian(o, s, z), torch.eye(4), size, size, focal, 0.0, tile=8)
    sigma2 = (focal * s / z) ** 2 + 0.3
    c = torch.arange(size) + 0.5 - size / 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    expected = o * torch.exp(-r2 / (2 * sigma2))
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))
    for ch in range(3):
        torch.testing.assert_close(out["image"][..., ch], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["alpha"], expected, atol=1e-6, rtol=1e-5)
    assert float(out["image"][..., 0].detach().sum()) == pytest.approx(o * 2 * math.pi * sigma2, rel=0.03)
    assert out["radii"].item() == math.ceil(3 * math.sqrt(sigma2))
    torch.testing.assert_close(out["means2d"], torch.tensor([[size / 2, size / 2]]))


def test_sh_colours_of_degree_0_and_1():
    from multimodal.gsplat_render import SH_C0, SH_C1, rgb_to_sh, sh_basis, sh_colour

    dirs = torch.nn.functional.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    rgb = torch.tensor([[0.2, 0.5, 0.9]]).expand(5, 3)
    dc = rgb_to_sh(rgb)[:, None]  # (5, 1, 3)
    torch.testing.assert_close(sh_colour(dc, dirs, 0), rgb)  # view-independent: C0·k + 0.5
    torch.testing.assert_close(dc[0, 0], (rgb[0] - 0.5) / SH_C0)
    up = torch.tensor([[0.0, 0.0, 1.0]])
    torch.testing.assert_close(sh_basis(up, 1), torch.tensor([[SH_C0, 0.0, SH_C1, 0.0]]))
    coeffs = torch.zeros(1, 4, 3)
    coeffs[0, 2] = 0.2  # the z-lobe: brighter seen along +z than along −z
    assert sh_colour(coeffs, up, 1)[0, 0] == pytest.approx(0.5 + 0.2 * SH_C1)
    assert sh_colour(coeffs, -up, 1)[0, 0] == pytest.approx(0.5 - 0.2 * SH_C1)
    for degree in range(4):
        basis = sh_basis(dirs, degree)
        assert basis.shape == (5, (degree + 1) ** 2)
    # orthonormality of the basis on the sphere, by Monte Carlo over many directions
    many = torch.nn.functional.normalize(torch.randn(200_000, 3, generator=torch.Generator().manual_seed(1),
                                                     dtype=torch.float64), dim=-1)
    gram = (sh_basis(many, 3).T @ sh_basis(many, 3)) * (4 * math.pi / len(many))
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=0.02, rtol=0)


def test_rasterizer_gradients_match_finite_differences_in_float64():
    from multimodal.gsplat_render import covariances, gl_to_view, project, rasterize, sh_colour

    gen = torch.Generator().manual_seed(3)
    n, size, focal = 3, 8, 10.0
    means = (torch.tensor([[0.1, -0.1, -4.0], [-0.2, 0.15, -4.5], [0.05, 0.0, -5.0]], dtype=torch.float64)
             .requires_grad_())
    log_scales = (torch.log(torch.full((n, 3), 0.3, dtype=torch.float64)) + 0.2 * torch.rand(n, 3, generator=gen,
                  dtype=torch.float64)).requires_grad_()
    quats = torch.randn(n, 4, generator=gen, dtype=torch.float64).requires_grad_()
    logits = torch.tensor([0.2, -0.3, 0.5], dtype=torch.float64, requires_grad=True)
    sh = (0.3 * torch.randn(n, 4, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    c2w = torch.eye(4, dtype=torch.float64)
    bg = torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64)

    def image(means, log_scales, quats, logits, sh):
        screen = project(means, covariances(log_scales, quats), gl_to_view(c2w), focal, size / 2, size / 2)
        dirs = torch.nn.functional.normalize(means - c2w[:3, 3], dim=-1)
        return rasterize(screen["means2d"], screen["conics"], sh_colour(sh, dirs, 1), torch.sigmoid(logits),
                         screen["depths"], screen["radii"], size, size, bg, tile=4)[0]

    assert image(means, log_scales, quats, logits, sh).shape == (size, size, 3)
    assert torch.autograd.gradcheck(image, (means, log_scales, quats, logits, sh), eps=1e-6, atol=1e-6)


def test_densify_clones_small_splits_large_and_prunes_transparent_gaussians():
    from multimodal.gsplat_train import densify_and_prune, fresh_stats, make_optimizer
    from multimodal.gsplat_render import GaussianCloud
    from multimodal.stages import GsplatConfig

    cfg = GsplatConfig(grad_threshold=1e-3, percent_dense=0.1, min_opacity=0.01)
    extent = 1.0
    cloud = GaussianCloud(4, 1)
    logit = math.log(0.5)
    cloud.set_tensors({
        "means": torch.arange(12.0).reshape(4, 3),
        "log_scales": torch.log(torch.tensor([[0.05] * 3, [0.4, 0.2, 0.2], [0.05] * 3, [0.05] * 3])),
        "quats": torch.tensor([[1.0, 0, 0, 0]] * 4),
        "opacity_logits": torch.tensor([logit, logit, logit, math.log(0.001)]),
        "sh_dc": torch.arange(12.0).reshape(4, 1, 3), "sh_rest": torch.zeros(4, 3, 3)})
    opt = make_optimizer(cloud, cfg, extent)
    (sum(p.sum() for p in cloud.parameters())).backward()
    opt.step()  # Adam moments exist now
    stats = fresh_stats(4)
    stats["grad_sum"] = torch.tensor([4e-3, 4e-3, 1e-4, 0.0])  # seen twice: mean 2e-3, 2e-3, 5e-5, 0
    stats["seen"] = torch.tensor([2.0, 2.0, 2.0, 2.0])
    before = {f: t.detach().clone() for f, t in cloud.tensors().items()}
    counts = densify_and_prune(cloud, opt, stats, cfg, extent, False, torch.Generator().manual_seed(0))
    assert counts == {"cloned": 1, "split": 1, "pruned": 1}
    # kept 0 and 2, then the clone of 0, then the two halves of 1
    assert len(cloud) == 5
    torch.testing.assert_close(cloud.means[:3].detach(), before["means"][[0, 2, 0]])
    torch.testing.assert_close(cloud.sh_dc[3:].detach(), before["sh_dc"][[1, 1]])
    torch.testing.assert_close(cloud.log_scales[3:].detach(), before["log_scales"][[1, 1]] - math.log(1.6))
    assert not torch.equal(cloud.means[3], cloud.means[4])
    assert ((cloud.means[3:] - before["means"][1]).abs().max(0).values <= 4 * torch.tensor([0.4, 0.2, 0.2])).all()
    for group in opt.param_groups:  # Adam follows the rows: kept moments stay, new rows start at zero
        state = opt.state[group["params"][0]]
        assert group["params"][0] is getattr(cloud, group["name"]) and state["exp_avg"].shape[0] == 5
        assert state["exp_avg"][:2].abs().sum() > 0 and state["exp_avg"][2:].abs().sum() == 0
    (sum(p.sum() for p in cloud.parameters())).backward()
    opt.step()  # the edited optimizer still steps


def test_scene_frame_finds_the_cameras_common_focus():
    from multimodal.gsplat_train import scene_frame
    from multimodal.nerf_scene import TARGET, ring_poses

    centre, extent = scene_frame(ring_poses(12, 4.0))
    np.testing.assert_allclose(centre, TARGET, atol=1e-6)
    assert extent == pytest.approx(4.4)


def test_smoke_run_trains_renders_and_is_deterministic(smoke_run, tmp_path):
    from PIL import Image

    from multimodal.gsplat_train import load_model, render_pose
    from multimodal.nerf_scene import orbit_pose

    m = read_manifest(smoke_run, "nerf_gsplat")
    assert m["status"] == "completed" and not (smoke_run / "nerf_gsplat" / "checkpoints").exists()
    metrics = m["metrics"]
    assert {"test_psnr", "test_ssim", "render_frames_per_s", "train_s", "gaussians", "mean_colour_psnr"} <= set(metrics)
    assert metrics["split"] + metrics["cloned"] > 0 and metrics["gaussians"] > 0
    assert len(metrics["curve"]) == 2 and metrics["test_psnr"] > metrics["mean_colour_psnr"]
    assert Image.open(smoke_run / "nerf_gsplat" / "turntable.gif").n_frames == 3
    cloud, meta = load_model(smoke_run / "nerf_gsplat")
    assert len(cloud) == metrics["gaussians"]
    img = render_pose(cloud, meta, orbit_pose(30.0, 20.0, meta["radius"]))
    assert img.shape == (16, 16, 3) and np.isfinite(img).all()
    again = tmp_path / "again"
    execute(again, ["nerf_data", "nerf_gsplat"])
    assert untimed(read_manifest(again, "nerf_gsplat")) == untimed(m)


def test_a_killed_stage_resumes_to_the_uninterrupted_result(smoke_run, tmp_path, monkeypatch, capsys):
    # killed at step 40 of 60 (after the checkpoint of step 30, three densifications later); the runner's re-run
    # resumes from step 30: the Gaussians (their count changed since) and Adam moments are restored
    from multimodal import gsplat_train

    real_render, calls = gsplat_train.render, []

    def killed_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30 + 3 + 10:  # 30 training views, 3 held-out views, 10 more steps
            raise Killed
        return real_render(*args, **kwargs)

    monkeypatch.setattr(gsplat_train, "render", killed_render)
    with pytest.raises(Killed):
        execute(tmp_path, ["nerf_data", "nerf_gsplat"])
    monkeypatch.setattr(gsplat_train, "render", real_render)
    assert (tmp_path / "nerf_gsplat.tmp" / "checkpoints" / "step_0000030").is_dir()
    capsys.readouterr()
    assert execute(tmp_path, ["nerf_gsplat"])["nerf_gsplat"]["status"] == "completed"
    assert "resuming at step 30" in capsys.readouterr().out
    whole, resumed = (gsplat_train.load_model(d / "nerf_gsplat")[0] for d in (smoke_run, tmp_path))
    for field, value in whole.tensors().items():
        torch.testing.assert_close(resumed.tensors()[field], value, msg=field)


@pytest.mark.slow
def test_a_short_fit_beats_the_mean_colour_image(tmp_path):
    # 32×32 views, 400 steps: far from converged, yet well above the best constant image
    over = ["nerf_data.image_size=32", "nerf_data.views=24", "nerf_data.test_views=4", "nerf_gsplat.steps=400",
            "nerf_gsplat.init_points=1500", "nerf_gsplat.densify_from=100", "nerf_gsplat.densify_until=300",
            "nerf_gsplat.reset_every=0", "nerf_gsplat.eval_every=200", "nerf_gsplat.turntable_frames=2"]
    execute(tmp_path, ["nerf_data", "nerf_gsplat"], over, preset="tiny")
    m = read_manifest(tmp_path, "nerf_gsplat")["metrics"]
    assert m["test_psnr"] > m["mean_colour_psnr"] + 6, m
    assert m["test_ssim"] > 0.5, m


@pytest.mark.slurm
@pytest.mark.slow
def test_gsplat_on_slurm_matches_the_local_run(slurm_cluster, smoke_run, tmp_path):
    # nerf_data -> nerf_gsplat as Slurm jobs (afterok) on the loopback cluster: the same fingerprints, outputs
    # (sha256 but for the timed curve) and metrics as this file's in-process smoke run
    from pipeline import jobs
    from pipeline.clusters import parse_profile
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs

    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:20:00"})
    names = ["nerf_data", "nerf_gsplat"]
    slurm = tmp_path / "slurm"
    states = run_stages(slurm, resolve_configs("smoke"), names, executor="slurm", profile=profile)
    records = jobs.read_records(slurm)
    assert set(states.values()) == {"completed"}, {n: jobs.stage_logs(records[n])[-2000:] for n in records}
    for name in names:
        assert untimed(read_manifest(slurm, name)) == untimed(read_manifest(smoke_run, name)), name
        assert records[name].executor == "slurm"


def test_aigc_nerf_gsplat_runs_its_chain_and_render_reads_it(tmp_path, capsys):
    # `aigc nerf gsplat` runs nerf_data -> nerf_gsplat through NeMo-Run (no NeRF is trained); `render --gsplat`
    # draws the Gaussians from a pose and round the scene; without --gsplat it asks for the NeRF
    from PIL import Image

    from multimodal.cli import nerf_main

    run_dir = tmp_path / "run"
    assert nerf_main(["gsplat", "--config", "smoke", "--run-dir", str(run_dir)]) == 0
    assert read_manifest(run_dir, "nerf_gsplat")["status"] == "completed" and not (run_dir / "nerf_train").exists()
    png, gif = tmp_path / "view.png", tmp_path / "round.gif"
    assert nerf_main(["render", "--gsplat", "--run-dir", str(run_dir), "--pose", "30,20", "--out", str(png),
                      "--scale", "1"]) == 0
    assert min(Image.open(png).size) >= 16  # one 16×16 view (in a grid frame)
    assert nerf_main(["render", "--gsplat", "--run-dir", str(run_dir), "--turntable", "2", "--out", str(gif)]) == 0
    assert Image.open(gif).n_frames == 2
    capsys.readouterr()
    assert nerf_main(["render", "--run-dir", str(run_dir)]) == 2
    assert "run `aigc nerf train" in capsys.readouterr().err
