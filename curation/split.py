"""The one train / held-out split of the LLM chain, decided once, by document id, in `tokenize`.

A document is held out where a seeded hash of its id falls under the held-out
fraction, so the decision does not depend on corpus order or size. A training
document that shares a word 13-gram (curation.decontam: normalised words, as in
GPT-3's contamination analysis) with a held-out document is dropped from
training altogether: near-copies of evaluation text must not be learnt.

`tokenize` writes the decision as `split.json`; every stage that trains on
the corpus (pretrain through tokenize's datasets; SFT and alignment data built
from documents) reads it, and `evaluate` scores the held-out documents only.

    {"seed": 0, "heldout_fraction": 0.1, "ngram": 13,
     "heldout": [ids...], "dropped_overlap": [ids...]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from curation.decontam import contaminated
from curation.shingles import ngram_hashes

SPLIT_FILE = "split.json"
NGRAM = 13
SplitOf = Callable[[str], "str | None"]  # document id -> "train", "val", or None (not to be used)


def heldout_score(doc_id: str, seed: int) -> float:
    """Return the seeded hash of `doc_id` as a number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
    """Return True where record or document `doc_id` belongs to the held-out split (a seeded hash decides)."""
    return heldout_score(doc_id, seed) < fraction


def by_hash(seed: int, fraction: float) -> SplitOf:
    """Return the split_of of records outside the chain's split (user files, tests): "val" by the seeded hash of
    the id (is_heldout), else "train"."""
    return lambda doc_id: "val" if is_heldout(doc_id, seed, fraction) else "train"


@dataclasses.dataclass(frozen=True)
class Split:
    """The decided split: held-out ids, and training ids dropped for sharing an n-gram with one of them."""

    heldout: frozenset[str]
    dropped_overlap: frozenset[str]
    seed: int
    heldout_fraction: float
    ngram: int = NGRAM

    def of(self, doc_id: str) -> str | None:
        """Return "val" for a held-out document, None for a dropped one, else "train"."""
        if doc_id in self.heldout:
            return "val"
        return None if doc_id in self.dropped_overlap else "train"

    def to_json(self) -> dict:
        """Return the split as the JSON of split.json (ids sorted)."""
        return {"seed": self.seed, "heldout_fraction": self.heldout_fraction, "ngram": self.ngram,
                "heldout": sorted(self.heldout), "dropped_overlap": sorted(self.dropped_overlap)}


def decide_split(docs: list[dict], seed: int, fraction: float, ngram: int = NGRAM) -> Split:
    """Return the split of documents {"id", "text"}: at least one held out and at least one left to train on."""
    if len(docs) < 2:
        raise ValueError(f"the split needs at least 2 documents, got {len(docs)}")
    scores = {d["id"]: heldout_score(d["id"], seed) for d in docs}
    heldout = {i for i, s in scores.items() if s < fraction}
    if not heldout:
        heldout = {min(scores, key=scores.get)}
    if len(heldout) == len(scores):
        heldout.discard(max(scores, key=scores.get))
    held_texts = [d["text"] for d in docs if d["id"] in heldout]
    train = [d for d in docs if d["id"] not in heldout]
    hashes, _ = ngram_hashes(held_texts, ngram, short_docs=False)
    hit = contaminated([d["text"] for d in train], np.unique(hashes), ngram)
    dropped = {d["id"] for d, h in zip(train, hit) if h}
    if len(dropped) == len(train):
        raise ValueError(f"every training document shares a {ngram}-gram with a held-out one: nothing left to train on")
    return Split(frozenset(heldout), frozenset(dropped), seed, fraction, ngram)


def write_split(path: Path, split: Split) -> None:
    """Write `split` as JSON to `path`."""
    Path(path).write_text(json.dumps(split.to_json(), indent=1) + "\n")


def read_split(path: Path) -> Split:
    """Return the Split written at `path` (split.json of a tokenize stage)."""
    data = json.loads(Path(path).read_text())
    return Split(frozenset(data["heldout"]), frozenset(data["dropped_overlap"]), data["seed"],
                 data["heldout_fraction"], data["ngram"])
