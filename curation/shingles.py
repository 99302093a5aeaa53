"""Word n-gram hashes of a batch of texts, shared by fuzzy dedup and decontamination.

Texts are normalised to lower-case word characters (`\\w+` runs, so
punctuation and whitespace differences vanish). Each distinct word gets a
64-bit SipHash (pandas' `hash_array`, fixed key: the same on every worker and
every run); an n-gram's hash is a polynomial over its words' hashes mod 2^64.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

WORD = re.compile(r"\w+")
POLY = np.uint64(0x100000001B3)  # FNV 64-bit prime: the polynomial's base


def normalized_words(text: str) -> list[str]:
    """Return the lower-case word-character runs of `text`."""
    return WORD.findall(text.lower())


def ngram_hashes(texts: Sequence[str], n: int, short_docs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (hashes, text index) of every word n-gram of `texts`, (S,) uint64 and (S,) int64.

    With `short_docs`, a text of fewer than n words (but at least one) gives one
    hash of all its words; otherwise it gives none. Hashes come in text order.
    """
    words = [normalized_words(t) for t in texts]
    counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(words), dtype=object, count=total)
    codes, uniques = pd.factorize(flat)
    word_hash = pd.util.hash_array(np.asarray(uniques, dtype=object))[codes]  # (W,) uint64
    doc = np.repeat(np.arange(len(texts)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    span = np.minimum(counts, n)[doc]  # words per n-gram of each word's text
    positions = np.arange(total)
    last = positions + span - 1
    valid = last < starts[doc + 1]  # the n-gram stays inside its text
    if not short_docs:
        valid &= span == n
    positions, span = positions[valid], span[valid]
    hashes = np.zeros(len(positions), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            inside = k < span
            hashes[inside] = hashes[inside] * POLY + word_hash[positions[inside] + k]
    return hashes, doc[positions]
