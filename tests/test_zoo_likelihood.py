"""Tests of the zoo's autoencoder and autoregressive recipes (ae, vae, vqvae_pixelcnn, pixelcnn) and its framework.

Each recipe trains a few steps under the `smoke` preset through the pipeline's runner
(one shared run dir: t2i_data once) and samples; bits/dim, the discretised logistic and
the PixelCNN's causality are checked on known cases.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from multimodal.zoo.registry import RECIPES

torch.set_num_threads(1)

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


def manifest(run_dir, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.mark.parametrize("name", MINE)
def test_recipe_trains_under_smoke_and_samples_deterministically(smoke_run, name):
    recipe = RECIPES[name]
    m = manifest(smoke_run, recipe.stage)
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
    m = manifest(smoke_run, "zoo_ae")["metrics"]
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
