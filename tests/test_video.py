"""Tests of the text-to-video recipe `video_data -> video_train`: the clips move as their captions say, the
temporal layers mix frames and the spatial ones do not, the stages run under `smoke` through the runner (GIFs
in the report, deterministic sampling, a killed stage resumes), a short training beats the trivial baselines,
and the chain on the loopback Slurm cluster equals the local run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import test_slurm
from test_slurm import read_manifest, untimed
from test_zoo_gans import execute  # runs stages through the runner in this process

torch.set_num_threads(1)
slurm_cluster = test_slurm.slurm_cluster  # the fixtures of the loopback cluster (skips when it is down)
stdin_from_devnull = test_slurm.stdin_from_devnull  # autouse: NeMo-Run's sbatch reads stdin
CHAIN = ["video_data", "video_train"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run video_data -> video_train under `smoke` through the runner in this process; return the run dir."""
    run_dir = tmp_path_factory.mktemp("video")
    states = execute(run_dir, "smoke", CHAIN)
    assert {n: m["status"] for n, m in states.items()} == dict.fromkeys(CHAIN, "completed")
    return run_dir


def test_clips_move_as_their_captions_say():
    from multimodal.video_config import VideoDataConfig
    from multimodal.video_data import DIRECTIONS, VELOCITY, as_frames, build_clips, caption
    from multimodal.video_metrics import consistency_figures, predicted_directions, shift, velocities

    cfg = VideoDataConfig(clips_per_kind=2, speed=1)
    data = build_clips(cfg, seed=3)
    assert data["clips"].shape == (22 * 4 * 2, 8, 3, 16, 16) and data["clips"].dtype == np.uint8
    clips = as_frames(data["clips"])
    expected = np.array([VELOCITY[DIRECTIONS[d]] for d in data["directions"]], dtype=float)
    np.testing.assert_allclose(velocities(clips), expected * cfg.speed, atol=1e-9)
    assert (predicted_directions(clips) == data["directions"]).all()
    for i in (0, 5, 77, 150):
        assert data["captions"][i] == caption(data["labels"][i], data["directions"][i])
        assert data["captions"][i].endswith(f"moving {DIRECTIONS[data['directions'][i]]}")
        dx, dy = VELOCITY[DIRECTIONS[data["directions"][i]]]
        np.testing.assert_array_equal(shift(clips[i, :-1], dx, dy), clips[i, 1:])  # each frame: the last, moved
    assert consistency_figures(clips, data["directions"], cfg.speed)["warp_error"] == 0.0
    assert np.array_equal(build_clips(cfg, seed=3)["clips"], data["clips"])
    fast = build_clips(dataclasses.replace(cfg, speed=2, frames=4, digits=False), seed=3)
    assert fast["labels"].min() == 10 and len(fast["labels"]) == 12 * 4 * 2
    np.testing.assert_allclose(np.abs(velocities(as_frames(fast["clips"]))).sum(1), 2.0)
    with pytest.raises(ValueError, match="room"):
        build_clips(dataclasses.replace(cfg, speed=2), seed=0)


def test_aigc_video_has_a_command_per_stage_and_sample():
    from multimodal.cli import stage_commands, video_parser
    from pipeline.stage import load_registry

    registry = load_registry()
    assert registry.chain("video") == tuple(CHAIN) and "video" in registry.commands
    (sub,) = [a for a in video_parser()._actions if a.dest == "command"]
    assert set(sub.choices) == {*stage_commands(registry.chain("video")), "sample"} == {"data", "train", "sample"}


def frames_changed(layer, x: torch.Tensor, frames: int, k: int) -> list[bool]:
    """Return, per frame of clip 0, whether the layer's output changes when only frame k of the input does."""
    y = layer(x)
    x2 = x.clone()
    x2[k] += torch.randn_like(x2[k])
    diff = (layer(x2) - y).abs().reshape(-1, frames, *y.shape[1:])[0]
    return [bool(diff[t].max() > 1e-6) for t in range(frames)]


def test_temporal_layers_mix_frames_and_spatial_layers_do_not():
    from multimodal.video_model import ResBlock, SpatialAttention, VideoDenoiser, temporal_layer

    torch.manual_seed(0)
    frames, c = 6, 8
    x = torch.randn(2 * frames, c, 4, 4)  # two clips of 6 frames, (B·T, C, H, W)
    emb, states, mask = torch.randn(2 * frames, 16), torch.randn(2 * frames, 3, 5), torch.ones(2 * frames, 3).bool()
    only_k = [t == 2 for t in range(frames)]
    res = ResBlock(c, c, 16)
    assert frames_changed(lambda v: res(v, emb), x, frames, 2) == only_k
    space = SpatialAttention(c, 5, 2)
    assert frames_changed(lambda v: space(v, states, mask), x, frames, 2) == only_k
    for kind in ("attention", "conv"):
        layer = temporal_layer(kind, c, 2, frames)
        changed = frames_changed(lambda v: layer(v, frames), x, frames, 2)
        assert changed[2] and changed[1] and changed[3], (kind, changed)
        if kind == "attention":
            assert all(changed)  # every frame attends to every frame
        else:
            assert changed == [False, True, True, True, False, False]  # kernel 3: the neighbours only
    assert frames_changed(lambda v: temporal_layer("none", c, 2, frames)(v, frames), x, frames, 2) == only_k
    # the whole denoiser: with temporal layers a frame's noise estimate depends on the other frames; without, not
    clip = torch.randn(1, frames, 3, 8, 8)
    t, text, text_mask = torch.tensor([500]), torch.randn(1, 4, 16), torch.ones(1, 4).bool()
    for kind, mixes in (("attention", True), ("none", False)):
        net = VideoDenoiser((8, 16), kind, 2, 16, frames, frame_size=8).eval()
        out = net(clip, t, text, text_mask)
        assert out.shape == clip.shape
        moved = clip.clone()
        moved[0, 0] += 1.0
        changed = (net(moved, t, text, text_mask) - out).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
        assert bool(changed[1:].any()) == mixes and bool(changed[0]), kind


def test_video_trains_under_smoke_and_samples_deterministically(smoke_run, tmp_path):
    from PIL import Image

    from multimodal.cli import video_main
    from multimodal.video_model import VideoModel

    m = read_manifest(smoke_run, "video_train")
    assert m["status"] == "completed" and not (smoke_run / "video_train" / "checkpoints").exists()
    metrics = m["metrics"]
    assert {"class_accuracy", "object_accuracy", "colour_accuracy", "motion_accuracy", "warp_error",
            "frame_difference", "identity_consistency", "fid_like", "fid_like_real_floor", "real_motion_accuracy",
            "static_motion_accuracy", "noise_class_accuracy", "train_s"} <= set(metrics)
    assert metrics["real_motion_accuracy"] == 1.0 and metrics["real_warp_error"] == 0.0
    assert metrics["static_motion_accuracy"] == 0.0 and metrics["steps"] == 4
    gif = Image.open(smoke_run / "video_train" / "samples" / "generated.gif")
    assert gif.n_frames == 8 and gif.is_animated
    assert Image.open(smoke_run / "video_data" / "preview.gif").n_frames == 8
    model = VideoModel.load(smoke_run / "video_train")
    a = model.generate(["a red circle moving right", "a handwritten three moving up"], [5, 6], 2, 2.0)
    b = model.generate(["a red circle moving right", "a handwritten three moving up"], [5, 6], 2, 2.0)
    assert a.shape == (2, 8, 16, 16, 3) and np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], model.generate(["a red circle moving right"], [7], 2, 2.0)[0])
    out = tmp_path / "clip.gif"
    assert video_main(["sample", "a red circle moving right", "--run-dir", str(smoke_run), "--steps", "2",
                       "--num", "2", "--out", str(out)]) == 0
    assert Image.open(out).n_frames == 8


def test_the_run_report_shows_the_gifs(smoke_run):
    from pipeline.report import collect, render

    html = render(smoke_run, collect(smoke_run, CHAIN, {}))
    assert html.count("data:image/gif;base64,") >= 3  # the data preview, the generated and the real grids
    assert "samples: generated.gif" in html and "motion_accuracy" in html


class Killed(Exception):
    """Stands for the stage's process being killed mid-run."""


def test_a_killed_video_stage_resumes_to_the_uninterrupted_weights(smoke_run, tmp_path, monkeypatch, capsys):
    """The runner re-runs a failed stage in its work dir: the loop resumes from the checkpoint of step 2
    (weights, AdamW moments, torch and loop RNGs) and ends with the uninterrupted run's weights and figures."""
    from safetensors.torch import load_file

    from multimodal import video_train

    real_loop = video_train.train_loop

    def killed_at_step_3(ctx, phase, modules, optimizers, steps, step_fn, gen, every, **kwargs):
        def step(i):
            if i == 3:
                raise Killed
            return step_fn(i)
        return real_loop(ctx, phase, modules, optimizers, steps, step, gen, every, **kwargs)

    monkeypatch.setattr(video_train, "train_loop", killed_at_step_3)
    with pytest.raises(Killed):
        execute(tmp_path, "smoke", CHAIN)
    monkeypatch.setattr(video_train, "train_loop", real_loop)
    capsys.readouterr()
    assert execute(tmp_path, "smoke", ["video_train"])["video_train"]["status"] == "completed"
    assert "resuming after step 2 of 4" in capsys.readouterr().out
    weights = "denoiser/denoiser.safetensors"
    whole, resumed = load_file(smoke_run / "video_train" / weights), load_file(tmp_path / "video_train" / weights)
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, msg=key)
    assert untimed(read_manifest(tmp_path, "video_train")) == untimed(read_manifest(smoke_run, "video_train"))


@pytest.mark.slow
def test_a_short_training_beats_the_trivial_baselines(tmp_path):
    # shapes only, 150 steps (about 45 CPU s): generated clips beat uniform noise on the judge's class accuracy and
    # the FID-like distance, and the first frame held still on motion accuracy
    over = ["video_data.digits=false", "video_data.clips_per_kind=12", "video_train.channels=16,32",
            "video_train.text_dim=32", "video_train.heads=2", "video_train.steps=150", "video_train.batch_size=16",
            "video_train.checkpoint_every=150", "video_train.sample_steps=10", "video_train.eval_per_prompt=2",
            "video_train.judge_frames=2000"]
    m = execute(tmp_path, "smoke", CHAIN, over)["video_train"]["metrics"]
    assert m["prediction"] == "sample" and m["final_loss"] < 0.1, m
    assert m["class_accuracy"] > 2 * m["noise_class_accuracy"], m
    assert m["fid_like"] < 0.1 * m["noise_fid_like"], m
    assert m["motion_accuracy"] > m["static_motion_accuracy"] == 0.0, m
    assert m["warp_error"] < m["static_warp_error"] * 4, m


@pytest.mark.slurm
@pytest.mark.slow
def test_video_chain_on_slurm_matches_the_local_run(slurm_cluster, smoke_run, tmp_path):
    # video_data -> video_train as Slurm jobs (afterok) on the loopback cluster: the same fingerprints, outputs
    # (weights, GIFs: sha256) and metrics as the runner's run of the same smoke configs in this process
    from pipeline import jobs
    from pipeline.clusters import parse_profile
    from pipeline.execution import run_stages
    from pipeline.presets import resolve_configs

    profile = parse_profile("loopback", {"account": "aigc", "partition": "debug", "time": "00:20:00"})
    states = run_stages(tmp_path, resolve_configs("smoke"), CHAIN, executor="slurm", profile=profile)
    records = jobs.read_records(tmp_path)
    assert set(states.values()) == {"completed"}, {n: jobs.stage_logs(records[n])[-2000:] for n in records}
    for name in CHAIN:
        assert untimed(read_manifest(tmp_path, name)) == untimed(read_manifest(smoke_run, name)), name
        assert records[name].executor == "slurm"
