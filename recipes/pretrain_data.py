"""Pretraining data: megatron-core GPTDatasets over the tokenize stage's indexed datasets.

The tokenize stage writes `train.{bin,idx}` and `valid.{bin,idx}` (one
document per sequence, ending in eos). megatron-core's `GPTDataset` packs them
into fixed-length samples (documents concatenated across sample boundaries,
shuffled with a fixed seed, as many epochs as the requested sample count
needs). Sample k of the training set is the same on every run with the same
seed, so the batch of step s is a pure function of s: resuming needs no
data-loader state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizer


def build_gpt_datasets(
    data_dir: Path,
    tokenizer_dir: Path,
    seq_length: int,
    train_samples: int,
    seed: int,
    cache_dir: Path,
) -> tuple[GPTDataset, GPTDataset]:
    """Return (train, valid) GPTDatasets; train holds at least `train_samples` samples.

    Index caches (document/sample/shuffle indices) are written to `cache_dir`.
    """
    tokenizer = MegatronTokenizer.from_pretrained(str(tokenizer_dir), metadata_path={"library": "huggingface"})
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[([str(data_dir / "train")], None), ([str(data_dir / "valid")], None), None],
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


def batch(dataset: GPTDataset, indices: range, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
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
