"""Pretraining data: megatron-core GPTDatasets over the tokenize stage's indexed datasets.

The tokenize stage writes `train.{bin,idx}` and `valid.{bin,idx}` (one
document per sequence, ending in eos). megatron-core's `GPTDataset` packs them
into fixed-length samples (documents concatenated across sample boundaries,
shuffled with a fixed seed, as many epochs as the requested sample count
needs). Sample k of the training set is the same on every run with the same
seed, so the batch of step s is a pure function of s: resuming needs no
data-loader state.

Training data may blend several indexed datasets (same tokenizer) with weights:
megatron's `BlendedDataset` then interleaves their samples so that after any n
samples each dataset has supplied its share of n within one sample (its
greedy, deterministic blending index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizer


def train_blend(
    data_dir: Path, prefixes: tuple[str, ...], weights: tuple[float, ...]
) -> tuple[list[str], list[float] | None]:
    """Return megatron's (prefixes, weights) of the training blend; weights None = one dataset, unweighted.

    No prefixes: the tokenize stage's train split (`data_dir/train`) alone. The
    prefix "tokenize" stands for that split inside a blend. Each prefix names
    an indexed dataset (`<prefix>.bin` + `<prefix>.idx`); weights are relative.
    """
    if not prefixes:
        return [str(data_dir / "train")], None
    if len(weights) != len(prefixes) or min(weights) <= 0:
        raise ValueError(f"data_weights {list(weights)}: give one positive weight per data prefix {list(prefixes)}")
    paths = [str(data_dir / "train") if p == "tokenize" else p for p in prefixes]
    missing = [p for p in paths if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file())]
    if missing:
        raise FileNotFoundError(f"no indexed dataset (.bin + .idx) at prefix {missing}")
    return paths, list(weights)


def build_gpt_datasets(
    data_dir: Path,
    tokenizer_dir: Path,
    seq_length: int,
    train_samples: int,
    seed: int,
    cache_dir: Path,
    blend: tuple[list[str], list[float] | None] | None = None,
) -> tuple[GPTDataset | BlendedDataset, GPTDataset]:
    """Return (train, valid) datasets; train holds at least `train_samples` samples.

    `blend` is `train_blend`'s (prefixes, weights) (default: the train split
    of `data_dir` alone, a GPTDataset; a weighted blend is a BlendedDataset of
    GPTDatasets). Validation is `data_dir/valid`. Index caches
    (document/sample/shuffle and blending indices) are written to `cache_dir`.
    torch.distributed must be initialised (`recipes.megatron_model.init_model_parallel`).
    """
    tokenizer = MegatronTokenizer.from_pretrained(str(tokenizer_dir), metadata_path={"library": "huggingface"})
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[blend or ([str(data_dir / "train")], None), ([str(data_dir / "valid")], None), None],
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,  # the model learns to end a document
        create_attention_mask=False,  # one causal mask is built once, in `batch`
    )
    # valid: None = one pass over the validation documents
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, None, None], lambda: True, config).build()
    return train, valid


def batch(
    dataset: GPTDataset | BlendedDataset, indices: range, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Return the samples `indices` of `dataset` stacked on `device`: tokens/labels/loss_mask [b, s]."""
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([s[key] for s in samples]).to(device) for key in ("tokens", "labels", "loss_mask")}


def causal_mask(seq_length: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Return megatron's attention mask [1, 1, s, s]: True where a query may NOT attend."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def unigram_loss(data_dir: Path, vocab_size: int, labels: torch.Tensor, loss_mask: torch.Tensor) -> float:
    """Return the mean cross-entropy (nats) of `labels` under the training set's add-one unigram model."""
    dtype = IndexedDataset(str(data_dir / "train")).index.dtype
    tokens = np.memmap(data_dir / "train.bin", dtype=dtype, mode="r")
    counts = np.bincount(tokens, minlength=vocab_size)[:vocab_size].astype(np.float64)
    log_p = torch.from_numpy(np.log(counts + 1.0) - np.log(counts.sum() + vocab_size))
    nll = -log_p[labels.cpu()] * loss_mask.cpu()  # [b, s]
    return float(nll.sum() / loss_mask.sum().cpu())
