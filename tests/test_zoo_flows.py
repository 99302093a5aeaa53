"""Tests of the normalizing-flow recipes of the model zoo (RealNVP, Glow): exact invertibility,
log-determinants against brute-force Jacobians, bits/dim of known densities, the stages under the
`smoke` preset through the runner, and a short training run against the per-dimension baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from multimodal.zoo.flows import (ActNorm, AffineCoupling, GlowCoupling, InvConv1x1, Preprocess, Squeeze,
                                  bits_per_dim, build_flow, dequantize, gaussian_baseline_nll,
                                  histogram_baseline_bpd, initialize_actnorms, heldout_nll, train_flow)
from multimodal.zoo.flows_config import GlowConfig, RealNVPConfig
from multimodal.zoo.registry import RECIPES

torch.set_num_threads(1)

FLOWS = [name for name, r in RECIPES.items() if r.family == "flows"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run t2i_data, zoo_realnvp and zoo_glow under `smoke` through the runner; return the run dir."""
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs

    run_dir = tmp_path_factory.mktemp("zoo_flows")
    names = ["t2i_data", *(RECIPES[n].stage for n in FLOWS)]
    states = run_stages(run_dir, resolve_configs("smoke"), names)
    assert states == dict.fromkeys(names, "completed"), states
    return run_dir


def test_flow_recipes_are_registered():
    assert FLOWS == ["realnvp", "glow"]
    assert all("test_bits_per_dim" in RECIPES[n].key_metrics for n in FLOWS)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_flow_trains_under_smoke_and_samples_deterministically(smoke_run, name):
    from multimodal.zoo.flows import sample_flow

    recipe = RECIPES[name]
    m = json.loads((smoke_run / recipe.stage / "manifest.json").read_text())
    assert m["status"] == "completed" and not (smoke_run / recipe.stage / "checkpoints").exists()
    metrics = m["metrics"]
    assert {"params", "train_s", "test_bits_per_dim", "baseline_gaussian_bits_per_dim",
            "baseline_histogram_bits_per_dim", "train_bits_per_dim"} <= set(metrics)
    assert 0 < metrics["test_bits_per_dim"] < 20 and metrics["baseline_uniform_bits_per_dim"] == 8.0
    if name == "glow":  # judged under smoke (realnvp's smoke skips the judge), at its two temperatures
        assert {"fid_like_t0.7", "fid_like_t1"} <= set(metrics) and metrics["fid_like"] > metrics["fid_floor"] > 0
    assert {"config", "samples", "temperatures", "flow"} <= set(m["outputs"])
    assert (smoke_run / recipe.stage / "temperatures.png").is_file()
    sample = recipe.load_sample()
    assert sample is sample_flow
    a = sample(smoke_run / recipe.stage, 3, seed=5)
    b = sample(smoke_run / recipe.stage, 3, seed=5)
    assert a.shape == (3, 3, 16, 16) and torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, sample(smoke_run / recipe.stage, 3, seed=6))
    cold, hot = (sample(smoke_run / recipe.stage, 64, seed=1, temperature=t) for t in (0.2, 1.0))
    assert cold.std(0).mean() < hot.std(0).mean()  # a lower temperature draws closer to the mode
    with pytest.raises(ValueError):
        sample(smoke_run / recipe.stage, 2, seed=0, label=3)


def test_zoo_cli_samples_a_flow_at_a_temperature(smoke_run, tmp_path):
    from PIL import Image

    from multimodal.cli import zoo_main

    png = tmp_path / "glow.png"
    assert zoo_main(["glow", "sample", "--run-dir", str(smoke_run), "--num", "2", "--temperature", "0.5",
                     "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 2 * 16


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter (the zero-initialised output convs would make couplings the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def tiny_layers() -> dict[str, torch.nn.Module]:
    """Every bijection type on a (4, 4, 4) input, weights perturbed off the identity."""
    gen = torch.Generator().manual_seed(0)
    actnorm = ActNorm(4)
    actnorm.initialize(torch.randn(16, 4, 4, 4, generator=gen) * 3 + 1)
    layers = {
        "coupling_checkerboard_0": AffineCoupling(4, "checkerboard", 0, 8, 1),
        "coupling_checkerboard_1": AffineCoupling(4, "checkerboard", 1, 8, 0),
        "coupling_channel_0": AffineCoupling(4, "channel", 0, 8, 1),
        "coupling_channel_1": AffineCoupling(4, "channel", 1, 8, 0),
        "squeeze": Squeeze(),
        "actnorm": actnorm,
        "invconv_lu": InvConv1x1(4, lu=True, generator=gen),
        "invconv_plain": InvConv1x1(4, lu=False, generator=gen),
        "glow_coupling": GlowCoupling(4, 8),
    }
    return {k: randomize(v, i) for i, (k, v) in enumerate(layers.items())}


@pytest.mark.parametrize("name", list(tiny_layers()))
def test_each_layer_inverts_and_its_logdet_is_the_jacobian_slogdet(name):
    layer = tiny_layers()[name]
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, logdet = layer(x)
    assert y.shape[0] == 3 and y.numel() == x.numel() and logdet.shape == (3,)
    assert (layer.inverse(y) - x).abs().max() < 1e-4  # float32 round trip
    layer = layer.double()
    for i in range(2):
        xi = x[i: i + 1].double()
        jac = torch.autograd.functional.jacobian(lambda t: layer(t.view(1, 4, 4, 4))[0].flatten(), xi.flatten())
        sign, brute = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(layer(xi)[1][0], brute, rtol=1e-6, atol=1e-6)
    if name != "squeeze":
        assert abs(float(logdet[0])) > 1e-3  # a non-trivial log-det was checked


@pytest.mark.parametrize("kind", ["logit", "affine"])
def test_preprocessing_inverts_and_its_logdet_is_the_jacobian_slogdet(kind):
    pre = Preprocess(kind, 0.05)
    y = dequantize(torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8), torch.Generator().manual_seed(0))
    v, logdet = pre(y)
    assert (pre.inverse(v) - y).abs().max() < 1e-5
    jac = torch.autograd.functional.jacobian(lambda t: pre(t.view(1, 3, 2, 2))[0].flatten(), y[:1].double().flatten())
    torch.testing.assert_close(logdet[0].double(), torch.linalg.slogdet(jac)[1], rtol=1e-5, atol=1e-5)


def tiny_flows() -> dict[str, torch.nn.Module]:
    """Both recipes on a (3, 4, 4) input (two levels: a factored-out half each), weights perturbed."""
    realnvp = build_flow("realnvp", RealNVPConfig(hidden=8, blocks=1, scales=2, final_couplings=2), (3, 4, 4))
    glow = build_flow("glow", GlowConfig(hidden=8, levels=2, steps_per_level=2), (3, 4, 4))
    plain = build_flow("glow", GlowConfig(hidden=8, levels=2, steps_per_level=1, lu_decomposed=False), (3, 4, 4))
    flows = {"realnvp": realnvp, "glow": glow, "glow_plain_conv": plain}
    gen = torch.Generator().manual_seed(2)
    for i, flow in enumerate(flows.values()):
        initialize_actnorms(flow, torch.rand(32, 3, 4, 4, generator=gen))
        randomize(flow, 10 + i, 0.1)
    return flows


@pytest.mark.parametrize("name", ["realnvp", "glow", "glow_plain_conv"])
def test_whole_flow_inverts_and_its_density_is_the_change_of_variables(name):
    flow = tiny_flows()[name]
    v = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        zs, logdet, logprior = flow.encode(v)
    assert len(zs) == 2 and sum(z[0].numel() for z in zs) == 48  # multi-scale: a factored-out half + the top
    assert (flow.decode(zs) - v).abs().max() < 1e-4
    flow = flow.double()
    vi = v[:1].double()
    jac = torch.autograd.functional.jacobian(lambda t: torch.cat([z.flatten() for z in flow.encode(t.view(1, 3, 4, 4))[0]]),
                                             vi.flatten())
    with torch.no_grad():
        zs, logdet, logprior = flow.encode(vi)
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=1e-6, atol=1e-6)
    # and the log-prior: standard normal on the top, N(0, I) or the learned conditional Gaussian on the split half
    if name == "realnvp":
        z = torch.cat([z.flatten() for z in zs])
        torch.testing.assert_close(logprior[0], torch.tensor(stats.norm.logpdf(z.numpy()).sum(), dtype=z.dtype))
    # temperature sampling: shapes, finite, deterministic for a generator, colder = closer to the mode
    flow = flow.float()
    a = flow.sample(6, 0.7, torch.Generator().manual_seed(4))
    b = flow.sample(6, 0.7, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 4, 4) and torch.isfinite(a).all() and torch.equal(a, b)


def test_actnorm_data_dependent_init_gives_zero_mean_unit_variance():
    x = torch.randn(64, 5, 3, 3) * torch.tensor([1.0, 2, 3, 4, 5])[None, :, None, None] + 7
    layer = ActNorm(5)
    y, _ = layer(x)  # the first batch initialises
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(5), atol=1e-4, rtol=0)
    y2, _ = layer(x * 2)  # later batches do not re-initialise
    assert y2.std() > 1.5


def test_bits_per_dim_of_known_densities():
    images = torch.randint(0, 256, (200, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert bits_per_dim(0.0, 48) == 8.0  # the uniform density on the unit cube: 8 bits per 0..255 value
    # Freshly built flows are the identity (zero-initialised couplings, priors N(0, I)), so the density
    # of y is N(y − ½; 0, I) (affine) or that of logit(α + (1 − 2α) y) with its log-det (logit):
    for kind in ("affine", "logit"):
        flow = build_flow("realnvp", RealNVPConfig(hidden=4, preprocess=kind), (3, 4, 4))
        got = heldout_nll(flow, images, seed=5)
        y = dequantize(images, torch.Generator().manual_seed(5)).double().numpy()
        if kind == "affine":
            logp = stats.norm.logpdf(y - 0.5).reshape(200, -1).sum(1)
        else:
            p = 0.05 + 0.9 * y
            logp = (stats.norm.logpdf(np.log(p / (1 - p))) + np.log(0.9 / (p * (1 - p)))).reshape(200, -1).sum(1)
        assert got == pytest.approx(-logp.mean(), rel=1e-5)
        # bits/dim = nats per image / (D ln 2) + 8
        assert bits_per_dim(got, 48) == pytest.approx(-logp.mean() / (48 * math.log(2)) + 8)
    # baselines: per-dimension Gaussian of known spread; histograms of fair coins (≈ 1 bit/dim)
    gen = torch.Generator().manual_seed(1)
    coins = torch.randint(0, 2, (4000, 3, 2, 2), generator=gen).to(torch.uint8) * 255
    smoothed_half = 1500 / (3000 + 256)  # add-one smoothing over 256 bins: each seen value ≈ (1500 + 1) / (3000 + 256)
    assert histogram_baseline_bpd(coins[:3000], coins[3000:]) == pytest.approx(-math.log2(smoothed_half), abs=0.03)
    smooth = (torch.randn(20000, 1, 2, 2, generator=gen) * 20 + 128).clamp(0, 255).to(torch.uint8)
    # N(128, 20²) pixels: differential entropy of N(μ, (20/256)²) on the unit cube, + 8 bits
    expected = 0.5 * math.log2(2 * math.pi * math.e * (20 / 256) ** 2) + 8
    assert bits_per_dim(gaussian_baseline_nll(smooth[:10000], smooth[10000:], 0), 4) == pytest.approx(expected, abs=0.02)


class Killed(Exception):
    pass


def test_a_killed_glow_run_resumes_to_the_uninterrupted_weights(tmp_path, capsys):
    """ActNorm's data-dependent init must not re-run over restored weights: resume == uninterrupted."""
    from types import SimpleNamespace

    from multimodal.zoo.common import train_loop
    from multimodal.zoo.flows import make_step, prepare_training

    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = GlowConfig(hidden=8, steps_per_level=2, steps=6, batch_size=8, checkpoint_every=3)

    def train(out_dir, kill_at=None):
        ctx = SimpleNamespace(out_dir=out_dir, is_main=True, name="zoo_glow")
        torch.manual_seed(0)
        flow = build_flow("glow", cfg, (3, 8, 8))
        opt, gen = prepare_training(flow, cfg, images, seed=0)
        step = make_step(flow, opt, cfg, images, gen)

        def step_fn(i):
            if i == kill_at:
                raise Killed
            return step(i)

        train_loop(ctx, "glow", {"flow": flow}, {"adam": opt}, cfg.steps, step_fn, gen, cfg.checkpoint_every)
        return flow

    whole = train(tmp_path / "whole")
    with pytest.raises(Killed):
        train(tmp_path / "resumed", kill_at=4)  # after the checkpoint of step 3
    assert (tmp_path / "resumed" / "checkpoints" / "glow" / "step_0000003").is_dir()
    capsys.readouterr()
    resumed = train(tmp_path / "resumed")
    assert "resuming after step 3 of 6" in capsys.readouterr().out
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_samples_become_images_on_the_256_levels_even_where_an_inverse_overflowed():
    from multimodal.zoo.flows import to_images

    y = torch.tensor([0.0, 0.5, 0.999, 1.5, -0.2, float("nan"), float("inf"), float("-inf")])
    x = to_images(y)
    assert torch.isfinite(x).all() and x.abs().max() <= 1
    levels = (x + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().tolist() == [0, 128, 255, 255, 0, 0, 255, 0]


@pytest.mark.slow
def test_short_flow_training_beats_the_per_dimension_baselines():
    """Reduced settings (≈ 15 s each with one thread on an idle machine): 150 steps at batch 32, narrower
    coupling nets, on the digits + 10 shapes of each kind.

    The independent per-dimension Gaussian on the dequantised train split is the
    trivial baseline; both flows must beat it on the held-out split.
    """
    from multimodal.t2i_data import build_caption_set

    data = build_caption_set(16, 10, 0.1, True, seed=0)
    images = torch.from_numpy(data["images"])
    split = torch.from_numpy(data["split"])
    train, test = images[split == 0], images[split == 1]
    baseline = bits_per_dim(gaussian_baseline_nll(train, test, 0), 768)
    results = {}
    for name, cfg in (("realnvp", RealNVPConfig(hidden=16, steps=150, batch_size=32)),
                      ("glow", GlowConfig(hidden=32, steps=150, batch_size=32))):
        torch.manual_seed(0)
        flow = build_flow(name, cfg)
        train_flow(flow, cfg, train, seed=0)
        results[name] = bits_per_dim(heldout_nll(flow, test, seed=1), 768)
    assert all(bpd < baseline - 0.5 for bpd in results.values()), (results, baseline)
