"""Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`), written by megatron-core's own builder.

One sequence per document; `megatron.core.datasets.indexed_dataset.IndexedDataset(prefix)`
reads them back, and GPTDataset samples from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> type[np.number]:
    """Return the smallest dtype megatron-core uses for token ids below `vocab_size`."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def write_indexed_dataset(prefix: Path, sequences: Iterable[list[int]], vocab_size: int) -> tuple[int, int]:
    """Write each sequence as one document at `prefix`.{bin,idx}; return (documents, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=token_dtype(vocab_size))
    docs = tokens = 0
    for ids in sequences:
        builder.add_document(np.asarray(ids), [len(ids)])
        docs += 1
        tokens += len(ids)
    builder.finalize(get_idx_path(str(prefix)))
    return docs, tokens
