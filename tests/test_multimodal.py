"""Tests of the multimodal recipes: text-to-image latent diffusion and NeRF (tiny sizes, 1 thread)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from signal import SIGINT

import numpy as np
import pytest
import torch
from scipy import linalg, signal

from multimodal.diffusion import make_sampler, make_train_scheduler, sample
from multimodal.image_metrics import gaussian_window, psnr, ssim
from multimodal.nerf_model import (NerfField, positional_encoding, render_rays, sample_pdf, stratified_samples,
                                   volume_render)
from multimodal.nerf_scene import (FAR, NEAR, TARGET, camera_rays, focal_length, read_split, render_view,
                                   ring_poses, write_split)
from multimodal.t2i_data import build_caption_set, class_prompts
from multimodal.t2i_judge import frechet_distance
from multimodal.text_encoder import TextEncoder, WordTokenizer
from multimodal.vae import build_vae, reconstruction_mse, to_model_range, train_vae
from report_browser import ReportBrowser, manifest_metric

torch.set_num_threads(1)


# ---------------------------------------------------------------- text-to-image


def test_caption_set_is_deterministic_and_described():
    a = build_caption_set(16, 3, 0.1, True, seed=5)
    b = build_caption_set(16, 3, 0.1, True, seed=5)
    assert np.array_equal(a["images"], b["images"]) and a["captions"] == b["captions"]
    assert a["images"].shape == (1797 + 36, 3, 16, 16) and a["images"].dtype == np.uint8
    prompts = class_prompts()
    for label, caption in zip(a["labels"], a["captions"]):
        base = prompts[label]
        if label < 10:
            assert caption.startswith(base)
        else:  # "a red circle" may carry a size word: "a small red circle"
            assert caption.split()[-2:] == base.split()[-2:]
    assert any(c.endswith("thick strokes") for c in a["captions"]) and any("thin" in c for c in a["captions"])
    # a drawn red shape is red: its brightest pixels have R far above G and B
    red = a["images"][a["labels"] == prompts.index("a red circle")][0].reshape(3, -1)
    lit = red[0] > 100
    assert lit.sum() > 10 and (red[1][lit] < 90).all() and (red[2][lit] < 90).all()
    # grey digits: the three channels are equal
    digit = a["images"][0]
    assert np.array_equal(digit[0], digit[1]) and digit.max() > 200


def test_tokenizer_null_prompt_and_unknown_words():
    tok = WordTokenizer.fit(["a handwritten seven, thick strokes", "a red circle"])
    ids, mask = tok(["", "a red circle", "a purple circle"])
    assert ids.shape == (3, tok.max_length)
    assert mask[0].tolist() == [True] + [False] * (tok.max_length - 1)  # [BOS] only: never fully masked
    assert tok.vocab[ids[1, 1]] == "a" and tok.vocab[ids[1, 3]] == "circle"
    assert tok.vocab[ids[2, 2]] == "[UNK]" and tok.unknown_words("a purple circle") == ["purple"]
    enc = TextEncoder(len(tok.vocab), tok.max_length, 16, 1, 2)
    states = enc(ids, mask)
    assert states.shape == (3, tok.max_length, 16) and torch.isfinite(states).all()


def test_vae_reconstruction_improves_with_training():
    data = build_caption_set(8, 2, 0.0, False, seed=0)
    images = to_model_range(data["images"][::4])  # (~460, 3, 8, 8) in [-1, 1]
    torch.manual_seed(0)
    vae = build_vae(8, (8, 16), 4)
    before = reconstruction_mse(vae, images)
    history = train_vae(vae, images, steps=80, batch_size=32, lr=3e-3, kl_weight=1e-3, seed=0, progress=False)
    after = reconstruction_mse(vae, images)
    assert len(history) == 80
    assert after < 0.35 * before, (before, after)


def cosine_alphas_cumprod(timesteps: int) -> np.ndarray:
    """Reference ᾱ_t of the squaredcos_cap_v2 schedule, computed here in float64."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)])
    return np.cumprod(1 - betas)


def toy_denoiser(x, t, states, mask):
    """A fixed, prompt-dependent 'eps prediction': states (B, L, 1) shift it, t scales it."""
    return 0.3 * x + 0.001 * t.float() + states.mean(dim=(1, 2))[:, None, None, None]


def test_ddim_sampling_matches_hand_computed_steps_with_guidance():
    train = make_train_scheduler(1000, "squaredcos_cap_v2")
    ddim = make_sampler(train, "ddim")
    abar = cosine_alphas_cumprod(1000)
    np.testing.assert_allclose(train.alphas_cumprod.numpy(), abar, rtol=2e-5, atol=1e-7)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = (torch.full((3, 2, 1), 0.5), torch.ones(3, 2, dtype=torch.bool))
    uncond = (torch.full((3, 2, 1), -0.2), torch.ones(3, 2, dtype=torch.bool))
    guidance, steps = 3.0, 4
    got = sample(toy_denoiser, ddim, noise, cond, uncond, steps, guidance)

    # x_{t-1} = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev) · ε,  x̂0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t,  ε = ε_u + g (ε_c − ε_u)
    x = noise.double()
    for t in (750, 500, 250, 0):  # 1000 // 4 apart ("leading" spacing), ᾱ_prev = 1 after the last step
        tt = torch.tensor(t)
        eps_c = toy_denoiser(x, tt, cond[0].double(), cond[1])
        eps_u = toy_denoiser(x, tt, uncond[0].double(), uncond[1])
        eps = eps_u + guidance * (eps_c - eps_u)
        a_t, a_prev = abar[t], (abar[t - 250] if t >= 250 else 1.0)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


class MixtureDenoiser:
    """The exact ε-prediction for 1-D data: a mixture of N(+1, s²) and N(−1, s²).

    The prompt state (B, 1, 1) is the weight of the +1 component: a weak
    conditional model (0.7) or the unconditional one (0.5).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, spread: float = 0.1):
        self.abar = alphas_cumprod.double()
        self.s2 = spread ** 2

    def __call__(self, x, t, states, mask):
        a = self.abar[t]
        w_plus = states[:, 0, 0].double()[:, None, None, None]
        var = a * self.s2 + 1 - a
        x = x.double()
        means = (1.0, -1.0)
        logp = torch.stack([torch.log(w if m > 0 else 1 - w) - (x - a.sqrt() * m) ** 2 / (2 * var)
                            for m, w in ((m, w_plus) for m in means)])
        post = torch.softmax(logp, 0)
        x0 = sum(post[k] * (m + a.sqrt() * self.s2 / var * (x - a.sqrt() * m)) for k, m in enumerate(means))
        return ((x - a.sqrt() * x0) / (1 - a).sqrt()).float()


def test_classifier_free_guidance_moves_samples_toward_the_prompt():
    train = make_train_scheduler(1000, "squaredcos_cap_v2")
    denoise = MixtureDenoiser(train.alphas_cumprod)
    n = 400
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    cond = (torch.full((n, 1, 1), 0.7), torch.ones(n, 1, dtype=torch.bool))
    uncond = (torch.full((n, 1, 1), 0.5), torch.ones(n, 1, dtype=torch.bool))
    share = {}
    for g in (0.0, 1.0, 4.0):
        x = sample(denoise, make_sampler(train, "ddim"), noise, cond, uncond, 50, g)
        share[g] = float((x > 0).float().mean())
    assert 0.4 < share[0.0] < 0.6  # unconditional: both modes
    assert 0.6 < share[1.0] < 0.8  # the weak conditional model alone
    assert share[4.0] > 0.95, share  # guidance sharpens toward the prompt
    ddpm = sample(denoise, make_sampler(train, "ddpm"), noise, cond, uncond, 100, 4.0, torch.Generator().manual_seed(2))
    assert float((ddpm > 0).float().mean()) > 0.9


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


# ---------------------------------------------------------------- NeRF


def test_volume_rendering_matches_analytic_transmittance():
    near, far, s = 2.0, 6.0, 0.7
    # constant density: T(t) = exp(−s (t − near)), opacity = 1 − exp(−s (far − near)) for any sample positions
    t = torch.sort(torch.cat([torch.tensor([[near]]), near + (far - near) * torch.rand(1, 63)], -1), -1).values
    colour = torch.tensor([0.2, 0.5, 0.9])
    out = volume_render(torch.full_like(t, s), colour.expand(1, 64, 3), t, far, background=1.0)
    trans = out["weights"] / (1 - torch.exp(-s * torch.diff(torch.cat([t, torch.tensor([[far]])], -1))))
    torch.testing.assert_close(trans, torch.exp(-s * (t - near)), rtol=1e-5, atol=1e-6)
    opacity = 1 - math.exp(-s * (far - near))
    assert float(out["opacity"]) == pytest.approx(opacity, rel=1e-5)
    torch.testing.assert_close(out["colour"][0], colour * opacity + (1 - opacity), rtol=1e-5, atol=1e-6)
    # linear density σ(t) = k (t − near): T(t) = exp(−k (t − near)² / 2), dense stratified samples
    k = 0.5
    t = stratified_samples(near, far, 4000, 1, perturb=True, generator=torch.Generator().manual_seed(0))
    out = volume_render(k * (t - near), torch.zeros(1, 4000, 3), t, far, background=0.0)
    alpha = 1 - torch.exp(-k * (t - near) * torch.diff(torch.cat([t, torch.tensor([[far]])], -1)))
    trans = out["weights"] / alpha
    torch.testing.assert_close(trans, torch.exp(-k * (t - near) ** 2 / 2), rtol=0, atol=2e-3)
    assert float(out["opacity"]) == pytest.approx(1 - math.exp(-k * (far - near) ** 2 / 2), abs=2e-3)


def test_importance_samples_fall_where_the_weights_are():
    bins = torch.linspace(2.0, 6.0, 9).expand(5, 9)  # 8 bins of width 0.5
    weights = torch.zeros(5, 8)
    weights[:, 3] = 1.0  # all mass in [3.5, 4.0)
    t = sample_pdf(bins, weights, 64, perturb=True, generator=torch.Generator().manual_seed(0))
    inside = ((t >= 3.5) & (t <= 4.0)).float().mean()
    assert inside > 0.99
    stratified = stratified_samples(2.0, 6.0, 8, 5, perturb=True, generator=torch.Generator().manual_seed(0))
    assert ((stratified >= bins[:, :-1]) & (stratified < bins[:, 1:])).all()  # one sample per bin


def test_positional_encoding_and_field_shapes():
    x = torch.tensor([[0.25, -0.5, 1.0]])
    enc = positional_encoding(x, 2)
    assert enc.shape == (1, 15)
    torch.testing.assert_close(enc[0, 3:6], torch.sin(math.pi * x[0]))
    torch.testing.assert_close(enc[0, 12:15], torch.cos(2 * math.pi * x[0]))
    field = NerfField(4, 2, 32, 3, 2.5)
    sigma, rgb = field(torch.randn(7, 5, 3), torch.nn.functional.normalize(torch.randn(7, 5, 3), dim=-1))
    assert sigma.shape == (7, 5) and rgb.shape == (7, 5, 3) and (sigma >= 0).all() and ((rgb >= 0) & (rgb <= 1)).all()


def test_ssim_matches_a_direct_computation_and_psnr_is_mse_based():
    rng = np.random.default_rng(0)
    a = rng.random((20, 24, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    w = gaussian_window().numpy()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    per_channel = []
    for c in range(3):
        x, y = a[..., c], b[..., c]
        f = lambda img: signal.correlate2d(img, w, mode="valid")  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        per_channel.append(((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())
    assert ssim(torch.tensor(a), torch.tensor(b)) == pytest.approx(np.mean(per_channel), rel=1e-9)
    assert ssim(torch.tensor(a), torch.tensor(a)) == pytest.approx(1.0)
    assert psnr(torch.zeros(4, 4, 3), torch.full((4, 4, 3), 0.1)) == pytest.approx(20.0)


def test_scene_cameras_look_at_the_target_and_round_trip_the_blender_format(tmp_path):
    poses = ring_poses(6, 4.0)
    focal = focal_length(16, 40.0)
    for pose in poses:
        to_target = np.array(TARGET) - pose[:3, 3]
        assert np.allclose(-pose[:3, 2], to_target / np.linalg.norm(to_target), atol=1e-6)  # looks down −z
        assert np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-6)
    origins, dirs = camera_rays(torch.tensor(poses[0], dtype=torch.float32), 16, 16, focal)
    assert origins.shape == dirs.shape == (16, 16, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(16, 16))
    images = [render_view(p, 16, focal, 1) for p in poses[:2]]
    assert images[0].min() < 0.5 and images[0].max() == 1.0  # objects and white background
    write_split(tmp_path, "train", images, list(poses[:2]), 40.0, 16, focal)
    back, back_poses, meta = read_split(tmp_path, "train")
    assert np.abs(back - np.stack(images)).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(back_poses, poses[:2], atol=1e-6)
    assert meta["camera_angle_x"] == pytest.approx(math.radians(40.0))
    assert 0.5 * 16 / math.tan(meta["camera_angle_x"] / 2) == pytest.approx(focal)  # peer readers derive focal so


def test_short_nerf_run_beats_a_fixed_psnr():
    size, focal = 16, focal_length(16, 40.0)
    poses = ring_poses(13, 4.0)
    images = torch.tensor(np.stack([render_view(p, size, focal, 1) for p in poses]))  # (13, 16, 16, 3)
    rays = [camera_rays(torch.tensor(p, dtype=torch.float32), size, size, focal) for p in poses]
    origins = torch.stack([o for o, _ in rays])
    dirs = torch.stack([d for _, d in rays])
    train_o, train_d, train_c = (v[:12].reshape(-1, 3) for v in (origins, dirs, images))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    coarse, fine = NerfField(6, 2, 48, 3, 2.5), NerfField(6, 2, 48, 3, 2.5)
    opt = torch.optim.Adam(list(coarse.parameters()) + list(fine.parameters()), lr=5e-3)
    for _ in range(250):
        idx = torch.randint(0, train_c.shape[0], (256,), generator=gen)
        out = render_rays(coarse, fine, train_o[idx], train_d[idx], NEAR, FAR, 16, 16, True, 1.0, gen)
        loss = (out["coarse"] - train_c[idx]).pow(2).mean() + (out["fine"] - train_c[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held = render_rays(coarse, fine, origins[12].reshape(-1, 3), dirs[12].reshape(-1, 3), NEAR, FAR, 16, 16,
                           False, 1.0)["fine"].reshape(size, size, 3)
    baseline = psnr(train_c.mean(0).expand(size, size, 3), images[12])
    got = psnr(held, images[12])
    assert got > 17.0 and got > baseline + 5.0, (got, baseline)


# ---------------------------------------------------------------- recipes through the stage contract


@pytest.mark.slow
def test_recipes_run_as_stages_from_the_cli(tmp_path, capsys):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image

    from multimodal.cli import nerf_main, t2i_main
    from pipeline import cli

    run = tmp_path / "t2i"
    assert t2i_main(["train", "--config", "smoke", "--run-dir", str(run)]) == 0
    for stage in ("t2i_data", "t2i_vae", "t2i_train"):
        m = json.loads((run / stage / "manifest.json").read_text())
        assert m["status"] == "completed" and not (run / f"{stage}.tmp").exists()
    metrics = json.loads((run / "t2i_train" / "manifest.json").read_text())["metrics"]
    assert {"digit_accuracy_g1", "digit_accuracy_g3", "fid_like_g3", "judge_real_test_accuracy"} <= set(metrics)
    assert metrics["judge_real_test_accuracy"] > 0.9  # the judge itself reads real images
    vae_metrics = json.loads((run / "t2i_vae" / "manifest.json").read_text())["metrics"]
    assert vae_metrics["recon_mse_after"] < vae_metrics["recon_mse_before"]
    vae = AutoencoderKL.from_pretrained(run / "t2i_vae" / "vae")  # peer readers: diffusers
    unet = UNet2DConditionModel.from_pretrained(run / "t2i_train" / "unet")
    assert DDPMScheduler.from_pretrained(run / "t2i_train" / "scheduler").config.clip_sample is False
    assert unet.config.in_channels == vae.config.latent_channels
    assert Image.open(run / "t2i_train" / "samples" / "epoch_001.png").size[0] > 100
    out = tmp_path / "three.png"
    assert t2i_main(["sample", "a handwritten three", "--run-dir", str(run), "--steps", "3", "--num", "2",
                     "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * (16 * 4 + 1) + 1, 16 * 4 + 2)
    mtime = (run / "t2i_train" / "manifest.json").stat().st_mtime_ns
    assert t2i_main(["train", "--config", "smoke", "--run-dir", str(run)]) == 0  # cached: nothing reruns
    assert (run / "t2i_train" / "manifest.json").stat().st_mtime_ns == mtime
    assert cli.main(["report", "--run-dir", str(run)]) == 0

    run = tmp_path / "nerf"
    assert nerf_main(["data", "--config", "smoke", "--run-dir", str(run)]) == 0  # one stage: nerf_data alone
    assert (run / "nerf_data" / "manifest.json").is_file() and not (run / "nerf_train").exists()
    assert cli.main(["report", "--run-dir", str(run), "--output", str(tmp_path / "partial.html")]) == 0
    data_mtime = (run / "nerf_data" / "manifest.json").stat().st_mtime_ns
    assert nerf_main(["train", "--config", "smoke", "--run-dir", str(run)]) == 0
    assert (run / "nerf_data" / "manifest.json").stat().st_mtime_ns == data_mtime  # reused, not re-run
    m = json.loads((run / "nerf_train" / "manifest.json").read_text())["metrics"]
    assert m["test_psnr"] > m["mean_colour_psnr"] and len(m["curve"]) == 2
    assert Image.open(run / "nerf_train" / "turntable.gif").n_frames == 3
    assert list((run / ".nemo_run" / "experiments").rglob("*.log"))  # each stage ran as a NeMo-Run task
    capsys.readouterr()
    assert cli.main(["status", "--run-dir", str(run)]) == 0
    rows = [line.replace("│", " ").split()[:2] for line in capsys.readouterr().out.splitlines() if "nerf_" in line]
    assert rows[:2] == [["nerf_data", "completed"], ["nerf_train", "completed"]]
    assert nerf_main(["render", "--run-dir", str(run), "--pose", "10,30", "--out", str(tmp_path / "v.png")]) == 0
    assert Image.open(tmp_path / "v.png").size == (16 * 4 + 2, 16 * 4 + 2)

    # the reports, in a real browser (tests/report_browser.py): the partial NeRF run, the t2i run, and the
    # finished NeRF run through `aigc report --serve`
    t2i = tmp_path / "t2i"
    with ReportBrowser() as browser:  # skips (saying why) only where there is no Chromium
        browser.check((tmp_path / "partial.html").as_uri(), {"nerf_data": "completed", "nerf_train": "not run"},
                      ("nerf_data", "train_views", manifest_metric(run, "nerf_data", "train_views")), min_images=1)
        page = browser.check((t2i / "report.html").as_uri(), dict.fromkeys(("t2i_data", "t2i_vae", "t2i_train"),
                             "completed"), ("t2i_train", "fid_like_g3", metrics["fid_like_g3"]), min_images=5)
        alts = page.evaluate("Array.from(document.images).map(i => i.alt)")
        assert {"preview", "reconstructions", "loss_curve", "samples"} <= set(alts), alts
        server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "report", "--run-dir", str(run), "--serve",
                                   "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = [server.stdout.readline(), server.stdout.readline()]
            url = next((w for w in " ".join(lines).split() if w.startswith("http://127.0.0.1:")), None)
            assert url, lines
            page = browser.check(url, {"nerf_data": "completed", "nerf_train": "completed"},
                                 ("nerf_train", "test_psnr", m["test_psnr"]), min_images=5)
            alts = page.evaluate("Array.from(document.images).map(i => i.alt)")
            assert {"turntable", "psnr_curve", "test_views", "renders: test_0.png"} <= set(alts), alts
            assert page.locator("svg.chart").count() >= 2  # PSNR and SSIM from curve.json
        finally:
            server.send_signal(SIGINT)
            assert server.wait(timeout=30) == 0
