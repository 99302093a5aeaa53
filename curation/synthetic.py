"""A generated corpus with planted near-duplicates and junk, for the curate benchmark and dedup tests.

Documents of 80-600 words are drawn (seeded) from the prose sentences of
the shipped pydoc corpus (1,467 of them), in paragraphs of 3-6 sentences. Then:

- near-duplicates of earlier documents, each of one kind: `word_edits`
  (1-3% of words replaced, deleted or inserted), `sentence_swap` (two
  sentences exchanged), `boilerplate` (a footer of 8-16 words appended),
  `case_whitespace` (lower-cased or upper-cased words, doubled spaces and
  line breaks). A variant always comes after its original.
- junk that the heuristic rules should drop: too short, symbol soup,
  one line repeated, policy boilerplate.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re

from curation.shipped_data import PYDOC_FILE

NEAR_DUP_KINDS = ("word_edits", "sentence_swap", "boilerplate", "case_whitespace")
JUNK_KINDS = ("short", "symbols", "repeated_line", "policy")
FOOTERS = (
    "Share this page with your friends and colleagues on any social network you like.",
    "Copyright 2024 Example Corporation. All rights reserved worldwide.",
    "Posted in Programming, Python and Tutorials. Leave a comment below.",
    "Subscribe to the weekly digest to get new articles in your inbox.",
)


@dataclasses.dataclass
class SyntheticCorpus:
    """The generated records and what was planted in them."""

    records: list[dict]  # {"id", "text"}, in corpus order
    origin: dict[str, str]  # near-duplicate id -> id of the document it was made from
    kind: dict[str, str]  # planted id (near-duplicate or junk) -> its kind


PROSE_WORD = re.compile(r"[\"(]?[A-Za-z][A-Za-z'-]*[\")]?[,.;:?!]?")


def pydoc_sentences() -> list[str]:
    """Return the prose sentences of the shipped pydoc corpus, whitespace collapsed.

    Prose: 5-40 words, at least 90% of them plain words (no code), no curly bracket.
    """
    sentences = []
    with open(PYDOC_FILE, encoding="utf-8") as f:
        for line in f:
            text = re.sub(r"\s+", " ", json.loads(line)["text"])
            sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)]
    return [
        s for s in sentences
        if 5 <= len(s.split()) <= 40 and "{" not in s
        and sum(bool(PROSE_WORD.fullmatch(w)) for w in s.split()) >= 0.9 * len(s.split())
    ]


def _document(rng: random.Random, sentences: list[str]) -> list[list[str]]:
    """Return a document of 80-600 words as paragraphs of sentences."""
    target = rng.randint(80, 600)
    picked, seen, words = [], set(), 0
    while words < target:
        i = rng.randrange(len(sentences))
        if i not in seen:
            seen.add(i)
            picked.append(sentences[i])
            words += len(sentences[i].split())
    paragraphs, i = [], 0
    while i < len(picked):
        size = rng.randint(3, 6)
        paragraphs.append(picked[i : i + size])
        i += size
    return paragraphs


def _render(paragraphs: list[list[str]]) -> str:
    """Return paragraphs of sentences as text."""
    return "\n\n".join(" ".join(p) for p in paragraphs)


def near_duplicate(rng: random.Random, paragraphs: list[list[str]], kind: str, vocabulary: list[str]) -> str:
    """Return a near-duplicate text of the document `paragraphs`, of `kind`."""
    if kind == "word_edits":
        words = _render(paragraphs).split(" ")
        for _ in range(max(1, round(len(words) * rng.uniform(0.01, 0.03)))):
            i = rng.randrange(len(words))
            op = rng.choice(("replace", "delete", "insert"))
            if op == "replace":
                words[i] = rng.choice(vocabulary)
            elif op == "delete" and len(words) > 1:
                del words[i]
            else:
                words.insert(i, rng.choice(vocabulary))
        return " ".join(words)
    if kind == "sentence_swap":
        flat = [(p, s) for p, para in enumerate(paragraphs) for s in range(len(para))]
        (p1, s1), (p2, s2) = rng.sample(flat, 2)
        swapped = [list(p) for p in paragraphs]
        swapped[p1][s1], swapped[p2][s2] = paragraphs[p2][s2], paragraphs[p1][s1]
        return _render(swapped)
    if kind == "boilerplate":
        footer = " ".join(rng.choice(FOOTERS).split()[: rng.randint(8, 16)])
        return _render(paragraphs) + "\n\n" + footer
    if kind == "case_whitespace":
        text = _render(paragraphs)
        if rng.random() < 0.5:
            text = text.lower()
        else:
            text = " ".join(w.upper() if rng.random() < 0.1 else w for w in text.split(" "))
        return text.replace(". ", ".  ").replace("\n\n", "\n\n\n")
    raise ValueError(f"unknown near-duplicate kind {kind!r}")


def junk(rng: random.Random, kind: str, sentences: list[str]) -> str:
    """Return a junk text of `kind` (one the heuristic rules drop)."""
    if kind == "short":
        return rng.choice(sentences)
    if kind == "symbols":
        return " ".join(rng.choice(("#", "###", "...", "|", "@@", "$", "%")) for _ in range(rng.randint(60, 200)))
    if kind == "repeated_line":
        line = rng.choice(sentences)
        return "\n".join([line] * rng.randint(20, 60))
    if kind == "policy":
        lines = ["By using this site you agree to our terms of use and privacy policy."] * 3
        return "\n\n".join(lines + ["This website uses cookies to improve your experience; see our cookie policy."] * 3)
    raise ValueError(f"unknown junk kind {kind!r}")


def generate(
    n_docs: int, seed: int = 0, near_dup_fraction: float = 0.1, junk_fraction: float = 0.05
) -> SyntheticCorpus:
    """Return a corpus of `n_docs` records: originals, junk, and near-duplicates each after its original."""
    rng = random.Random(seed)
    sentences = pydoc_sentences()
    vocabulary = sorted({w for s in sentences for w in s.split() if w.isalpha()})
    n_dups = int(n_docs * near_dup_fraction)
    n_junk = int(n_docs * junk_fraction)
    n_orig = n_docs - n_dups - n_junk
    originals = [_document(rng, sentences) for _ in range(n_orig)]
    records = [{"id": f"doc-{i}", "text": _render(p)} for i, p in enumerate(originals)]
    origin: dict[str, str] = {}
    kind: dict[str, str] = {}
    for k in range(n_junk):
        j = JUNK_KINDS[k % len(JUNK_KINDS)]
        records.insert(rng.randrange(len(records) + 1), {"id": f"junk-{k}", "text": junk(rng, j, sentences)})
        kind[f"junk-{k}"] = j
    position = {r["id"]: i for i, r in enumerate(records)}
    variants = []
    for k in range(n_dups):
        src = rng.randrange(n_orig)
        d = NEAR_DUP_KINDS[k % len(NEAR_DUP_KINDS)]
        vid = f"near-{k}"
        at = rng.randint(position[f"doc-{src}"] + 1, len(records))
        variants.append((at, vid, near_duplicate(rng, originals[src], d, vocabulary)))
        origin[vid], kind[vid] = f"doc-{src}", d
    for at, vid, text in sorted(variants, key=lambda v: -v[0]):  # from the back, so positions stay valid
        records.insert(at, {"id": vid, "text": text})
    return SyntheticCorpus(records, origin, kind)


def dedup_scores(removed: set[str], reached: set[str], corpus: SyntheticCorpus) -> dict[str, float]:
    """Return recall and precision of dedup on the planted near-duplicates, whichever copy it kept.

    `removed`: ids dedup removed; `reached`: ids that reached dedup (passed the
    filters). A planted group is an original and its near-duplicates that
    reached dedup; a group of n should lose n - 1 members. Recall: removals
    within groups (at most n - 1 each) over the sum of n - 1. Precision: those
    removals over all removals (removing a document with no planted twin, or
    every copy of a group, is wrong).
    """
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for doc_id in reached:
        groups[corpus.origin.get(doc_id, doc_id)].append(doc_id)
    expected = sum(len(g) - 1 for g in groups.values())
    found = sum(min(len(removed.intersection(g)), len(g) - 1) for g in groups.values())
    scores = {
        "planted": expected,
        "recall": round(found / max(expected, 1), 4),
        "precision": round(found / max(len(removed), 1), 4),
    }
    for kind in NEAR_DUP_KINDS:
        pairs = [(v, o) for v, o in corpus.origin.items() if corpus.kind[v] == kind and {v, o} <= reached]
        scores[f"recall_{kind}"] = round(sum(bool(removed & {v, o}) for v, o in pairs) / max(len(pairs), 1), 4)
    return scores
