"""Decontamination: find documents sharing a long word n-gram with evaluation texts.

N-grams are over normalised words (`curation.shingles`: lower-case word
characters), n = 13 by default as in GPT-3's contamination analysis (Brown et
al. 2020). Evaluation texts shorter than n words contribute no n-gram.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from curation.readers import iter_documents
from curation.shingles import ngram_hashes


def eval_ngrams(paths: Sequence[str | Path], n: int, text_field: str = "text") -> np.ndarray:
    """Return the sorted distinct n-gram hashes of the evaluation texts in `paths`, (G,) uint64."""
    texts = list(iter_documents(list(paths), text_field))
    hashes, _ = ngram_hashes(texts, n, short_docs=False)
    return np.unique(hashes)


def contaminated(texts: Sequence[str], eval_hashes: np.ndarray, n: int) -> np.ndarray:
    """Return per text whether one of its word n-grams is among `eval_hashes`, (D,) bool."""
    hit = np.zeros(len(texts), dtype=bool)
    if not len(eval_hashes):
        return hit
    hashes, doc = ngram_hashes(texts, n, short_docs=False)
    hit[doc[np.isin(hashes, eval_hashes)]] = True
    return hit
