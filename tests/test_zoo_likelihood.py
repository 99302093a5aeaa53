"""Tests of the zoo's autoencoder and autoregressive recipes (ae, vae, vqvae_pixelcnn, pixelcnn) and its framework.

Each recipe trains a few steps under the `smoke` preset through the pipeline's runner
(one shared run dir: t2i_data once) and samples; bits/dim, the discretised logistic and
the PixelCNN's causality are checked on known cases.
"""

from __future__ import annotations

import math

import pytest
import torch

from multimodal.zoo.registry import RECIPES
import test_slurm
from test_slurm import read_manifest, untimed

torch.set_num_threads(1)
slurm_cluster = test_slurm.slurm_cluster  # the fixtures of the loopback cluster (skips when it is down)
stdin_from_devnull = test_slurm.stdin_from_devnull  # autouse: NeMo-Run's sbatch reads stdin

MINE = [name for name, r in RECIPES.items() if r.family in ("autoencoders", "autoregressive")]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run t2i_data and every zoo recipe of these families under `smoke` through the runner, in this process
    (fingerprints, work dir, manifest; NeMo-Run's process per stage is left to the CLI and Slurm tests);
    return the run dir."""
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    run_dir = tmp_path_factory.mktemp("zoo")
    configs = configs_to_json(resolve_configs("smoke"))
    for name in ["t2i_data", *(RECIPES[n].stage for n in MINE)]:
        assert execute_stage(str(run_dir), name, configs)["status"] == "completed", name
    return run_dir


@pytest.mark.parametrize("name", MINE)
def test_recipe_trains_under_smoke_and_samples_deterministically(smoke_run, name):
    recipe = RECIPES[name]
    m = read_manifest(smoke_run, recipe.stage)
    assert m["status"] == "completed" and not (smoke_run / f"{recipe.stage}.tmp").exists()
    assert {"params", "train_s", *(k for k in recipe.key_metrics if k != "fid_like")} <= set(m["metrics"])
    assert {"config", "samples"} <= set(m["outputs"]) and not (smoke_run / recipe.stage / "checkpoints").exists()
    sample = recipe.load_sample()
    a = sample(smoke_run / recipe.stage, 3, seed=5)
    b = sample(smoke_run / recipe.stage, 3, seed=5)
    assert a.shape == (3, 3, 16, 16) and torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(smoke_run / recipe.stage, 3, seed=6))


def test_zoo_cli_lists_trains_cached_and_samples(smoke_run, tmp_path, capsys):
    from PIL import Image

    from multimodal.cli import zoo_main

    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES) and "autoencoders" in out
    mtime = (smoke_run / "zoo_ae" / "manifest.json").stat().st_mtime_ns
    assert zoo_main(["ae", "train", "--config", "smoke", "--run-dir", str(smoke_run)]) == 0  # cached
    assert (smoke_run / "zoo_ae" / "manifest.json").stat().st_mtime_ns == mtime
    png = tmp_path / "ae.png"
    assert zoo_main(["ae", "sample", "--run-dir", str(smoke_run), "--num", "2", "--out", str(png)]) == 0
    assert Image.open(png).size == (2 * (16 * 4 + 1) + 1, 16 * 4 + 2)
    assert zoo_main(["ae", "sample", "--run-dir", str(tmp_path / "none")]) == 2


def test_ae_metrics_and_pictures(smoke_run):
    m = read_manifest(smoke_run, "zoo_ae")["metrics"]
    assert 5 < m["test_psnr_db"] < 60 and m["fid_like"] > m["fid_floor"] > 0  # smoke: judged too
    assert (smoke_run / "zoo_ae" / "interpolation.png").is_file()


def test_bits_per_dim_of_known_distributions():
    from multimodal.zoo.common import bits_per_dim_continuous, bits_per_dim_discrete

    dims = 3 * 16 * 16
    assert bits_per_dim_discrete(dims * math.log(256), dims) == pytest.approx(8.0)  # uniform over 256 levels
    # the uniform density on the unit cube, dequantised: log p(y) = 0 -> 8 bits/dim, as the discrete uniform
    assert bits_per_dim_continuous(0.0, dims) == pytest.approx(8.0)
    # a Gaussian N(0, s^2) per dim on y: E[-log p] = ½ log(2πe s²) nats per dim
    s = 0.05
    y = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0)) * s
    nll = (0.5 * (y / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).sum(1).mean()
    expected = 0.5 * math.log2(2 * math.pi * math.e * s * s) + 8
    assert bits_per_dim_continuous(float(nll), 4) == pytest.approx(expected, abs=0.02)


def test_discretised_logistic_is_a_distribution_over_the_256_levels():
    from multimodal.zoo.likelihood import discretized_logistic_log_prob, mixture_log_prob

    levels = torch.arange(256).float() / 127.5 - 1
    for mean, log_scale in ((0.3, -2.0), (-1.0, -5.0), (0.99, 0.5), (0.0, -4.0)):
        p = discretized_logistic_log_prob(levels, torch.tensor(mean), torch.tensor(log_scale)).exp()
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-4)
    # the R -> G -> B mixture of one pixel: for a fixed R, its mass over all 256^2 (G, B) is the mixture of the
    # components' R masses (so G's and B's conditionals each sum to one, and the whole to one with R's)
    mixtures = 2
    params = torch.randn(1, 10 * mixtures, 1, 1, generator=torch.Generator().manual_seed(0)) * 0.5
    params[:, mixtures + 3 * mixtures: mixtures + 6 * mixtures] = -1.5  # log-scales: a few levels wide
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    weights = torch.softmax(params[0, :mixtures, 0, 0], 0)
    r_means, r_log_scales = params[0, mixtures: 2 * mixtures, 0, 0], params[0, 4 * mixtures: 5 * mixtures, 0, 0]
    for r in (levels[3], levels[140]):
        x = torch.stack([torch.full_like(g, float(r)), g, b], dim=-1).reshape(-1, 3, 1, 1)
        mass = float(mixture_log_prob(x, params.expand(len(x), -1, -1, -1), mixtures).exp().sum())
        r_mass = float((weights * discretized_logistic_log_prob(r, r_means, r_log_scales).exp()).sum())
        assert mass == pytest.approx(r_mass, rel=1e-3)


@pytest.mark.parametrize("vocab", [0, 7])
def test_pixelcnn_output_at_a_pixel_depends_only_on_earlier_pixels(vocab):
    from multimodal.zoo.likelihood import GatedPixelCNN

    torch.manual_seed(0)
    size = 6
    net = GatedPixelCNN(0 if vocab else 3, 8, 4, 3, 5, vocab=vocab)
    if vocab:  # codes: the gradient reaches the embedded map
        x = torch.randint(0, vocab, (1, size, size))
        h0 = net.embed(x).permute(0, 3, 1, 2).detach().requires_grad_(True)
        net.embed = None
        net.inp = torch.nn.Identity()
        x = h0
    else:
        x = torch.rand(1, 3, size, size).requires_grad_(True)
    out = net(x)
    for i in range(size * size):
        r, c = divmod(i, size)
        (grad,) = torch.autograd.grad(out[0, :, r, c].sum(), x, retain_graph=True)
        depends = grad[0].abs().sum(0).flatten() > 0
        assert not depends[i:].any(), (r, c, depends.nonzero().flatten().tolist())
        if i > 0:  # and it sees the pixel just before it and the one above (no blind spot there)
            assert (c == 0 or depends[i - 1]) and (r == 0 or depends[i - size])
    # a change at pixel i leaves the outputs of pixels <= i alone
    with torch.no_grad():
        changed = x.clone()
        changed[0, :, 3, 2] += 1.0
        diff = (net(changed) - out).abs().sum(1)[0].flatten()
    assert diff[: 3 * size + 3].max() == 0 and diff[3 * size + 3:].max() > 0


def test_vector_quantizer_straight_through_ema_and_code_statistics():
    from multimodal.zoo.likelihood import VectorQuantizer, code_statistics

    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, decay=0.5)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    vq.embed_sum.copy_(vq.codebook)
    vq.cluster_size.fill_(1.0)
    vq.initialised.fill_(1.0)
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.0, -0.1], [1.1, 0.0]]).T.reshape(1, 2, 2, 2).requires_grad_(True)
    vq.eval()
    q, idx, _ = vq(z)
    assert idx.flatten().tolist() == [1, 2, 0, 1]
    assert torch.allclose(q, vq.lookup(idx))
    (grad,) = torch.autograd.grad((q * torch.arange(8.0).view(1, 2, 2, 2)).sum(), z)
    assert torch.equal(grad, torch.arange(8.0).view(1, 2, 2, 2))  # straight through: dq/dz = I
    vq.train()
    before = vq.codebook.clone()
    vq(z.detach())
    for code, target in ((0, torch.tensor([0.0, -0.1])), (1, torch.tensor([1.0, 0.05])), (2, torch.tensor([0.1, 0.8]))):
        # each used code moves toward the mean of the vectors assigned to it
        assert (vq.codebook[code] - target).norm() < (before[code] - target).norm(), code
    assert torch.allclose(vq.codebook[3], torch.tensor([5.0, 5.0]), atol=1e-3)  # unused, no restart: in place
    stats = code_statistics(torch.tensor([0, 1, 2, 3] * 5), 16)
    assert stats == {"codebook_usage": 0.25, "codebook_perplexity": 4.0}


def test_train_loop_resumes_after_a_kill_to_the_uninterrupted_result(tmp_path):
    from multimodal.zoo.common import train_loop
    from pipeline.stage import StageContext

    def run(out_dir, kill_at=None):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # buffers ride along
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        ctx = StageContext("zoo_test", None, tmp_path, out_dir, {})

        def step(i):
            if i == kill_at:
                raise KeyboardInterrupt
            loss = net(torch.randn(8, 3, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.item()}

        log = train_loop(ctx, "p", {"net": net}, {"adam": opt}, 10, step, gen, checkpoint_every=3)
        return net.state_dict(), log

    whole, log = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at=7)  # checkpoint of step 6 on disk
    resumed, log_b = run(tmp_path / "b")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [row[1] for row in log["history"]] == [row[1] for row in log_b["history"]]



BEAT_BASELINE = [  # reduced settings (1/10 of the default steps or less, narrower nets): ~40 s together
    "zoo_ae.steps=150", "zoo_ae.judge=false",
    "zoo_vae.steps=200", "zoo_vae.kl_warmup=50",
    "zoo_vqvae_pixelcnn.vq_steps=150", "zoo_vqvae_pixelcnn.prior_steps=150", "zoo_vqvae_pixelcnn.codebook_size=32",
    "zoo_pixelcnn.steps=100", "zoo_pixelcnn.channels=16", "zoo_pixelcnn.layers=3", "zoo_pixelcnn.mixtures=3",
]


@pytest.mark.slow
def test_recipes_beat_trivial_baselines_on_their_metric(tmp_path):
    """Reduced settings (BEAT_BASELINE on the smoke data set; the defaults train 10x longer): the AE's and
    VQ-VAE's held-out PSNR beat the train mean image's; the VAE's negative ELBO and the PixelCNN's NLL beat an
    independent per-sub-pixel histogram (bits/dim); the PixelCNN prior's bits per code beat the code histogram's."""
    from multimodal.zoo.common import psnr_db, read_data
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    configs = configs_to_json(resolve_configs("smoke", BEAT_BASELINE))
    for name in ["t2i_data", *(RECIPES[n].stage for n in MINE)]:
        assert execute_stage(str(tmp_path), name, configs)["status"] == "completed", name
    data = read_data(tmp_path / "t2i_data")
    mean_psnr = psnr_db(data.train.mean(0, keepdim=True).expand_as(data.test), data.test)
    m = {n: read_manifest(tmp_path, RECIPES[n].stage)["metrics"] for n in MINE}
    assert m["ae"]["test_psnr_db"] > mean_psnr + 3, (m["ae"], mean_psnr)
    assert m["vqvae_pixelcnn"]["test_psnr_db"] > mean_psnr + 3, (m["vqvae_pixelcnn"], mean_psnr)
    assert m["vae"]["test_bits_per_dim"] < m["vae"]["baseline_bits_per_dim"], m["vae"]
    assert m["pixelcnn"]["test_bits_per_dim"] < m["pixelcnn"]["baseline_bits_per_dim"], m["pixelcnn"]
    vq = m["vqvae_pixelcnn"]
    assert vq["prior_bits_per_code"] < vq["unigram_bits_per_code"] < vq["uniform_bits_per_code"], vq
    assert vq["codebook_usage"] > 0.5


@pytest.mark.slurm
@pytest.mark.slow
def test_zoo_recipes_of_every_family_on_slurm_match_the_local_run(slurm_cluster, smoke_run, tmp_path):
    # t2i_data -> one recipe of each family (vae, pixelcnn, dcgan, glow) as Slurm jobs (afterok) on the loopback
    # cluster: the same fingerprints, outputs (weights, samples, pictures: sha256) and metrics as the runner's run
    # of the same smoke configs in this process (this file's smoke run; the GAN and the flow run here)
    from pipeline import jobs
    from pipeline.clusters import parse_profile
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    others = ["zoo_dcgan", "zoo_glow"]
    local = tmp_path / "local"
    for name in ["t2i_data", *others]:
        assert execute_stage(str(local), name, configs_to_json(resolve_configs("smoke")))["status"] == "completed"
    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:20:00"})
    names = ["t2i_data", "zoo_vae", "zoo_pixelcnn", *others]
    slurm = tmp_path / "slurm"
    states = run_stages(slurm, resolve_configs("smoke"), names, executor="slurm", profile=profile)
    records = jobs.read_records(slurm)
    assert set(states.values()) == {"completed"}, {n: jobs.stage_logs(records[n])[-2000:] for n in records}
    for name in names:
        reference = local if name in others else smoke_run
        assert untimed(read_manifest(slurm, name)) == untimed(read_manifest(reference, name)), name
        assert records[name].executor == "slurm"


def test_fid_like_is_torchmetrics_fid_on_the_judge_features():
    # the zoo's (and t2i's) FID-like distance is torchmetrics' FrechetInceptionDistance with the judge's hidden
    # features in place of Inception's (torch-fidelity's Inception weights are a download: not offline here)
    import numpy as np
    from torchmetrics.image.fid import FrechetInceptionDistance

    from multimodal.t2i_judge import frechet_distance

    class GivenFeatures(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            return x

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(280, 16))
    fid = FrechetInceptionDistance(feature=GivenFeatures(), normalize=True)
    fid.update(torch.tensor(real, dtype=torch.float64), real=True)
    fid.update(torch.tensor(fake, dtype=torch.float64), real=False)
    assert float(fid.compute()) == pytest.approx(frechet_distance(fake, real), rel=1e-9)
