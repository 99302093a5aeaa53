"""A document quality classifier: logistic regression on hashed word n-grams, in numpy.

Features: each text's word 1..`ngram`-grams (normalised words, see
`curation.shingles`) hashed into 2^`bits` buckets, counted, then scaled to
unit L2 norm (as fastText-style classifiers do with bags of n-grams). Trained
by full-batch gradient descent with L2 regularisation on "good" texts
(label 1) vs "bad" texts (label 0); its score is P(good).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from curation.shingles import ngram_hashes


@dataclasses.dataclass
class QualityModel:
    """Weights of the hashed-n-gram logistic regression."""

    weights: np.ndarray  # (2^bits,) float32
    bias: float
    ngram: int
    bits: int


def features(texts: Sequence[str], ngram: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the sparse unit-norm feature rows of `texts` as (row, column, value) arrays."""
    rows, cols = [], []
    for n in range(1, ngram + 1):
        hashes, doc = ngram_hashes(texts, n, short_docs=False)
        rows.append(doc)
        cols.append((hashes >> np.uint64(64 - bits)).astype(np.int64))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    pairs, counts = np.unique(np.stack([rows, cols]), axis=1, return_counts=True)
    values = counts.astype(np.float32)
    norms = np.sqrt(np.bincount(pairs[0], weights=values**2, minlength=len(texts)))
    return pairs[0], pairs[1], values / np.maximum(norms[pairs[0]], 1e-12).astype(np.float32)


def _logits(w: np.ndarray, b: float, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    """Return w . x + b for each of `n` sparse rows, (n,)."""
    return np.bincount(rows, weights=vals * w[cols], minlength=n) + b


def train(
    good: Sequence[str], bad: Sequence[str], ngram: int = 2, bits: int = 18, epochs: int = 200,
    lr: float = 2.0, l2: float = 1e-4,
) -> QualityModel:
    """Return the logistic regression trained on `good` (label 1) vs `bad` (label 0) texts."""
    if not good or not bad:
        raise ValueError(f"the quality classifier needs good and bad texts, got {len(good)} good, {len(bad)} bad")
    texts = list(good) + list(bad)
    labels = np.r_[np.ones(len(good)), np.zeros(len(bad))]
    class_weight = np.where(labels == 1, len(texts) / (2 * len(good)), len(texts) / (2 * len(bad)))
    rows, cols, vals = features(texts, ngram, bits)
    w = np.zeros(1 << bits)
    b = 0.0
    for _ in range(epochs):
        p = 1 / (1 + np.exp(-_logits(w, b, rows, cols, vals, len(texts))))
        err = (p - labels) * class_weight / len(texts)  # (N,) gradient of the mean log loss wrt the logits
        grad = np.bincount(cols, weights=vals * err[rows], minlength=len(w)) + l2 * w
        w -= lr * grad
        b -= lr * err.sum()
    return QualityModel(weights=w.astype(np.float32), bias=float(b), ngram=ngram, bits=bits)


def score(model: QualityModel, texts: Sequence[str]) -> np.ndarray:
    """Return P(good) of each text, (D,) float."""
    rows, cols, vals = features(texts, model.ngram, model.bits)
    return 1 / (1 + np.exp(-_logits(model.weights.astype(np.float64), model.bias, rows, cols, vals, len(texts))))
