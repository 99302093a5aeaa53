"""What every zoo recipe shares: the data, bits/dim, the judge, the training loop with checkpoints, the outputs.

    data = load_data(ctx)                               # split 0 trains, split 1 is reported
    log = train_loop(ctx, "model", modules, optimizers, cfg.steps, step_fn, gen, cfg.checkpoint_every)
    return finish(ctx, modules, metrics, samples, {"interpolation": "interpolation.png"})

Images are float tensors (N, 3, S, S) in [-1, 1]; a uint8 level k is (k / 127.5 - 1).
Bits per dimension (dims = 3·S·S per image):

- `bits_per_dim_discrete`: a model with a probability mass over the 256 levels of every
  sub-pixel (categorical, discretised logistic) -> NLL nats / (dims · ln 2).
- `bits_per_dim_continuous`: a density on uniformly dequantised data y = (x + u) / 256 in
  the unit cube (flows): -log2 P(x) >= -log2 p(y) + dims · 8, so bits/dim = nats / (dims · ln 2) + 8.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from multimodal.figures import print_figures
from multimodal.image_metrics import psnr
from multimodal.pictures import save_grid
from multimodal.t2i_data import class_prompts, read_caption_set
from pipeline.stage import StageContext, StageResult
from recipes.loop_checkpoint import LoopCheckpoints, resume_with_generator, save_with_generator

CHECKPOINTS = "checkpoints"  # <phase>/step_<n>/ under the stage's work dir, deleted by finish()
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.png"
JUDGE_PER_CLASS = 20  # real reference images per class of the judge; judge_sample_count() generated ones


@dataclasses.dataclass
class ZooData:
    """The caption set's images split for training (split 0) and reporting (split 1)."""

    train: torch.Tensor  # (N, 3, S, S) float32 in [-1, 1]
    test: torch.Tensor
    train_uint8: torch.Tensor  # (N, 3, S, S) uint8
    test_uint8: torch.Tensor
    train_labels: torch.Tensor  # (N,) long, class ids 0..21
    test_labels: torch.Tensor
    prompts: list[str]  # class id -> its prompt ("a handwritten three", "a red circle")
    raw: dict = dataclasses.field(repr=False, default_factory=dict)  # read_caption_set's dict (the judge's input)

    @property
    def image_size(self) -> int:
        return int(self.train.shape[-1])

    @property
    def dims(self) -> int:
        """Return the sub-pixels of one image (3·S·S)."""
        return int(self.train[0].numel())

    @property
    def num_classes(self) -> int:
        return len(self.prompts)


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """Return uint8 images as float32 in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def to_levels(images: torch.Tensor) -> torch.Tensor:
    """Return images in [-1, 1] as their nearest uint8 levels (long, 0..255)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().long()


def read_data(data_dir: Path) -> ZooData:
    """Return the caption set written by the `t2i_data` stage in `data_dir` as ZooData."""
    raw = read_caption_set(data_dir)
    images = torch.from_numpy(raw["images"])
    labels = torch.from_numpy(raw["labels"]).long()
    train, test = torch.from_numpy(raw["split"] == 0), torch.from_numpy(raw["split"] == 1)
    return ZooData(to_unit(images[train]), to_unit(images[test]), images[train], images[test],
                   labels[train], labels[test], class_prompts(), raw)


def load_data(ctx: StageContext) -> ZooData:
    """Return the upstream `t2i_data` stage's images (train = split 0, test = split 1)."""
    return read_data(ctx.input_path("t2i_data", "dataset").parent)


# ---------------------------------------------------------------- likelihoods


def bits_per_dim_discrete(nll_nats_total: float, dims: int) -> float:
    """Return bits per dimension of a discrete NLL: `nll_nats_total` nats over `dims` sub-pixels (256 levels each)."""
    return float(nll_nats_total) / (dims * math.log(2))


def bits_per_dim_continuous(nll_nats_on_unit_cube: float, dims: int) -> float:
    """Return bits per dimension of the 256-level data from a density on uniformly dequantised y = (x + u) / 256.

    -log2 p(y) / dims + 8: the bound -log2 P(x) <= E_u[-log2 p(y)] + dims·log2(256) of
    uniform dequantisation (the density on [0, 1)^dims is 256^dims times that per level).
    """
    return float(nll_nats_on_unit_cube) / (dims * math.log(2)) + 8.0


def psnr_db(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Return the PSNR (dB) of reconstructions in [-1, 1] (clamped) against targets, on the [0, 1] scale."""
    return psnr((recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2)


# ---------------------------------------------------------------- the judge

_JUDGES: dict[tuple, Any] = {}  # built once per process and data set


def judge_sample_count(data: ZooData, per_class: int = JUDGE_PER_CLASS) -> int:
    """Return how many generated images to judge: as many as the real reference holds (so the floor compares)."""
    labels = data.raw["labels"]
    return int(sum(min(per_class, int((labels == c).sum()) // 2) for c in np.unique(labels)))


def get_judge(data: ZooData, per_class: int = JUDGE_PER_CLASS, seed: int = 0):
    """Return multimodal.t2i_judge's judge of this data set (an MLP on the train split), built once per process."""
    from multimodal.t2i_judge import build_judge

    key = (data.raw["images"].shape, int(data.raw["images"][:64].sum()), per_class, seed)
    if key not in _JUDGES:
        _JUDGES[key] = build_judge(data.raw, per_class, seed)
    return _JUDGES[key]


def judge_images(data: ZooData, images: torch.Tensor, classes: torch.Tensor | None = None,
                 per_class: int = JUDGE_PER_CLASS) -> dict:
    """Return the judge's figures of generated images (N, 3, S, S) in [-1, 1].

    fid_like: the Fréchet distance of the judge's hidden features against a class-balanced
    real reference (per_class per class; generate judge_sample_count() images to compare
    with fid_floor, the same distance between two real sets of that size). accuracy (where
    `classes`, the intended class of each image, is given): the share the judge labels so.
    """
    from multimodal.t2i_judge import frechet_distance, judge_features, pixels

    judge = get_judge(data, per_class)
    hwc = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    out = {"fid_like": round(frechet_distance(judge_features(judge.classifier, hwc), judge.reference), 3),
           "fid_floor": round(judge.floor, 3)}
    if classes is not None:
        predicted = judge.classifier.predict(pixels(hwc))
        out["accuracy"] = round(float((predicted == np.asarray(classes)).mean()), 4)
    return out


# ---------------------------------------------------------------- training


def _buffers(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{m}/{n}": b for m, module in modules.items() for n, b in module.named_buffers()}


def train_loop(ctx: StageContext, phase: str, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], steps: int,
               step_fn: Callable[[int], dict[str, float]], gen: torch.Generator, checkpoint_every: int,
               log_every: int = 50) -> dict:
    """Run step_fn(step) for step = 0 .. steps-1 with checkpoints; return {"history", "train_s"}.

    Checkpoints (recipes.loop_checkpoint: trainable weights, optimizer moments, torch RNG,
    `gen`, the loop's history; module buffers such as EMA codebooks or BatchNorm statistics
    ride in the state) go to <work dir>/checkpoints/<phase>/ every `checkpoint_every` steps
    and at the last, so a killed stage resumes where it was and ends as an uninterrupted run;
    a finished phase of a multi-phase stage restores as finished. step_fn returns the step's
    losses (floats); draw all randomness from `gen` (or the torch RNG).
    """
    checkpoints = LoopCheckpoints(ctx.out_dir / CHECKPOINTS / phase, every=max(1, checkpoint_every), keep=1)
    start, state = resume_with_generator(checkpoints, modules, optimizers, gen)
    history: list[list[float]] = state.get("history", [])
    train_s = state.get("train_s", 0.0)
    if state.get("buffers"):
        buffers = _buffers(modules)
        with torch.no_grad():
            for name, value in state["buffers"].items():
                buffers[name].copy_(torch.tensor(value, dtype=buffers[name].dtype))
    if start and ctx.is_main:
        print(f"[{ctx.name}] {phase}: resuming after step {start} of {steps}", flush=True)
    for module in modules.values():
        module.train()
    started = time.time()
    for step in range(start, steps):
        losses = step_fn(step)
        history.append([step, *(float(v) for v in losses.values())])
        if ctx.is_main and ((step + 1) % log_every == 0 or step + 1 == steps):
            text = " ".join(f"{k}={float(v):.4f}" for k, v in losses.items())
            print(f"[{ctx.name}] {phase} step {step + 1}/{steps} {text}", flush=True)
        if checkpoints.due(step + 1, steps):
            train_s += time.time() - started
            started = time.time()
            save_with_generator(checkpoints, step + 1, modules, optimizers, gen,
                                {"history": history, "train_s": train_s,
                                 "buffers": {k: v.tolist() for k, v in _buffers(modules).items()}})
    if start < steps:
        train_s += time.time() - started
    for module in modules.values():
        module.eval()
    return {"history": history, "train_s": train_s}


def final_loss(history: list[list[float]], column: int = 1, window: int = 50) -> float:
    """Return the mean of a loss column over the last `window` steps of a train_loop history."""
    tail = [row[column] for row in history[-window:]]
    return round(float(np.mean(tail)), 4) if tail else float("nan")


# ---------------------------------------------------------------- outputs


def save_samples(images: torch.Tensor, path: Path, ncols: int, scale: int = 3) -> Path:
    """Write images (N, 3, S, S) in [-1, 1] as a PNG grid, `ncols` per row; return path."""
    hwc = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return save_grid(hwc, Path(path), ncols=ncols, scale=scale)


def config_dict(config: Any) -> dict:
    """Return a config dataclass as a JSON-able dict (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def finish(ctx: StageContext, modules: dict[str, torch.nn.Module], metrics: dict, samples: torch.Tensor,
           extra_pictures: dict[str, str] | None = None, extra_config: dict | None = None) -> StageResult:
    """Write the trained modules, config and samples, delete the checkpoints; return the StageResult.

    Writes <name>.safetensors per module (its state dict: weights and buffers), config.json
    (the stage's config, the image size, `extra_config`), samples.png (`samples`, 8 per row).
    `extra_pictures` are role -> file already written under ctx.out_dir (an interpolation grid).
    Metrics gain `params` (all modules) in front.
    """
    outputs = {}
    for name, module in modules.items():
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(ctx.out_dir / f"{name}.safetensors"))
        outputs[name] = f"{name}.safetensors"
    record = {"recipe": ctx.name.removeprefix("zoo_"), "config": config_dict(ctx.config),
              "image_size": int(samples.shape[-1]), **(extra_config or {})}
    (ctx.out_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    save_samples(samples, ctx.out_dir / SAMPLES_FILE, ncols=8)
    outputs.update({"config": CONFIG_FILE, "samples": SAMPLES_FILE, **(extra_pictures or {})})
    shutil.rmtree(ctx.out_dir / CHECKPOINTS, ignore_errors=True)
    params = sum(p.numel() for module in modules.values() for p in module.parameters())
    metrics = {"params": int(params), **metrics}
    if ctx.is_main:
        print_figures(f"{ctx.name}", metrics)
    return StageResult(outputs=outputs, metrics=metrics)


def read_stage(stage_dir: Path) -> dict:
    """Return the config.json a zoo stage wrote (recipe, config, image_size, ...)."""
    return json.loads((Path(stage_dir) / CONFIG_FILE).read_text())


def load_state(stage_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """Return the state dict of module `name` a zoo stage wrote."""
    return load_file(str(Path(stage_dir) / f"{name}.safetensors"))


def load_config(stage_dir: Path, config_cls: type) -> Any:
    """Return the stage's config as an instance of `config_cls` (lists back to tuples)."""
    saved = read_stage(stage_dir)["config"]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
