"""Heuristic quality rules of Gopher, C4 and FineWeb, scored a batch of documents at a time.

Each rule has a name (its reason in the stats when it drops a document), the
CurateConfig fields holding its bounds, and the paper that set them. A rule
keeps a document whose score lies within [low, high]. Rules come in the
groups the papers define, one Curator stage each; within a group the first
rule a document fails is its reason. The paper defaults:

    Gopher quality (Rae et al. 2021, sec. A.1.1): 50-100,000 words, mean word
      length 3-10, symbol (# and ellipsis) to word ratio <= 0.1, <= 90% lines
      starting with a bullet, <= 30% lines ending in an ellipsis, >= 80% words
      with a letter, >= 2 of the stop words {the, be, to, of, and, that, have, with}.
    Gopher repetition (table A1): duplicate line / paragraph fraction <= 0.30,
      their character fractions <= 0.20, top 2/3/4-gram character fraction
      <= 0.20/0.18/0.16, duplicate 5..10-gram character fraction <= 0.15..0.10.
    C4 (Raffel et al. 2020; thresholds of its reference code, tfds c4_utils):
      see `c4_clean`: lines without terminal punctuation, with < 3 words, a
      word > 1000 characters, "javascript" or a policy phrase are removed;
      pages with "lorem ipsum", a curly bracket, or < 5 sentences are dropped.
    FineWeb (Penedo et al. 2024): >= 12% lines ending in terminal punctuation,
      <= 67% lines of <= 30 characters, <= 1% characters in duplicated lines,
      <= 0.3 newlines per word.

Words are whitespace-separated tokens (as Curator's English word splitter);
lines and paragraphs split at one and at two or more newlines. The rules
whose definition Curator's heuristic filters share are checked against them
in the tests; these are rewritten because Curator's re-split the text and loop
per character in Python for every filter (2.6 ms/document for 28 of them on
the shipped corpus), while here the splits are made once per document and
the n-gram rules run vectorised over a whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "‣", "⁃", "⁌", "⁍", "∙", "○", "●", "◘", "◦", "⦾", "⦿", "-", "*")  # Curator's list + "-", "*"
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
C4_END_PUNCT = (".", "?", "!", '"')  # tfds c4_utils._END_MARKS
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?]+[\"')\]”’]*(?=\s|$)")
PARAGRAPH_BREAK = re.compile(r"\n{2,}")
LINE_BREAKS = re.compile(r"\n+")
HAS_LETTER = re.compile(r"[^\W\d_]")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A document rule: keep when `low <= score <= high` (bounds read from CurateConfig fields)."""

    name: str
    low: str | float | None = None  # CurateConfig field of the lower bound, or a fixed bound
    high: str | float | None = None  # CurateConfig field of the upper bound, or a fixed bound

    def bounds(self, cfg) -> tuple[float, float]:
        """Return (low, high) of this rule under `cfg` (-inf / inf where unbounded)."""
        return _bound(self.low, cfg, -np.inf), _bound(self.high, cfg, np.inf)


def _bound(bound: str | float | None, cfg, unbounded: float) -> float:
    """Return a rule bound: a CurateConfig field's value, a fixed number, or `unbounded`."""
    if bound is None:
        return unbounded
    return float(getattr(cfg, bound)) if isinstance(bound, str) else float(bound)


GOPHER_QUALITY = (
    Rule("word_count", "gopher_min_words", "gopher_max_words"),
    Rule("mean_word_length", "gopher_min_mean_word_length", "gopher_max_mean_word_length"),
    Rule("symbol_to_word", high="gopher_max_symbol_word_ratio"),
    Rule("bullet_lines", high="gopher_max_bullet_lines"),
    Rule("ellipsis_lines", high="gopher_max_ellipsis_lines"),
    Rule("alpha_words", low="gopher_min_alpha_words"),
    Rule("stop_words", low="gopher_min_stop_words"),
)
GOPHER_REPETITION = (
    Rule("repeated_lines", high="gopher_max_dup_line_frac"),
    Rule("repeated_paragraphs", high="gopher_max_dup_para_frac"),
    Rule("repeated_lines_char", high="gopher_max_dup_line_char_frac"),
    Rule("repeated_paragraphs_char", high="gopher_max_dup_para_char_frac"),
    *(Rule(f"top_{n}gram", high=f"gopher_max_top_{n}gram") for n in (2, 3, 4)),
    *(Rule(f"dup_{n}gram", high=f"gopher_max_dup_{n}gram") for n in range(5, 11)),
)
C4_PAGE = (
    Rule("boilerplate_string_ratio", high="c4_max_policy_paragraphs"),
    Rule("lorem_ipsum", high=0.0),
    Rule("curly_bracket", high="c4_max_curly_brackets"),
    Rule("c4_sentences", low="c4_min_sentences"),
)
C4_RULE_NAMES = tuple(r.name for r in C4_PAGE)
C4_LINE_RULES = ("c4_long_word", "c4_no_terminal_punct", "c4_few_words", "c4_javascript", "c4_policy")
C4_CITATIONS = "c4_citations"  # the edit removing citation markers
FINEWEB = (
    Rule("line_punct_ratio", low="fineweb_min_line_punct"),
    Rule("short_line_ratio", high="fineweb_max_short_lines"),
    Rule("char_dup_ratio", high="fineweb_max_char_dup"),
    Rule("list_ratio", high="fineweb_max_newlines_per_word"),
)
GROUPS: dict[str, tuple[Rule, ...]] = {
    "gopher_quality": GOPHER_QUALITY,
    "gopher_repetition": GOPHER_REPETITION,
    "c4": C4_PAGE,
    "fineweb": FINEWEB,
}


# ---------------------------------------------------------------- per-batch word table


class WordTable:
    """The whitespace words of a batch of texts, flattened.

    `starts[i]:starts[i+1]` are the positions of text i's words; `doc` gives
    each word's text. `ids` (distinct words numbered within the batch),
    `uniques` and `lengths` are computed on first use.
    """

    def __init__(self, texts: Sequence[str]):
        self.words = [t.split() for t in texts]
        self.counts = np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))  # (D,)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # (D+1,)
        self.doc = np.repeat(np.arange(len(texts)), self.counts)  # (W,)

    @functools.cached_property
    def _factorized(self) -> tuple[np.ndarray, np.ndarray]:
        total = int(self.counts.sum())
        if not total:
            return np.zeros(0, np.int64), np.zeros(0, object)
        flat = np.fromiter(itertools.chain.from_iterable(self.words), dtype=object, count=total)
        ids, uniques = pd.factorize(flat)
        return ids.astype(np.int64), np.asarray(uniques, dtype=object)

    @property
    def ids(self) -> np.ndarray:
        """Return each word's id, (W,) int64."""
        return self._factorized[0]

    @property
    def uniques(self) -> np.ndarray:
        """Return the distinct words, (U,) object."""
        return self._factorized[1]

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Return each word's length in characters, (W,) int64."""
        unique_lengths = np.fromiter(map(len, self.uniques), dtype=np.int64, count=len(self.uniques))
        return unique_lengths[self.ids]


def word_table(texts: Sequence[str]) -> WordTable:
    """Return the `WordTable` of `texts`."""
    return WordTable(texts)


def per_doc_sum(table: WordTable, values: np.ndarray) -> np.ndarray:
    """Return the sum of a per-word array over each text's words, (D,)."""
    return np.bincount(table.doc, weights=values, minlength=len(table.starts) - 1)


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """Return num/den, with `empty` where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


# ---------------------------------------------------------------- n-gram statistics

TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


def _first_occurrences(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (codes numbering distinct keys in order of first appearance, mask of first occurrences)."""
    codes, _ = pd.factorize(keys)
    seen_max = np.maximum.accumulate(codes)
    is_first = np.empty(len(codes), dtype=bool)
    is_first[:1] = True
    is_first[1:] = codes[1:] > seen_max[:-1]
    return codes, is_first


def _per_doc_max(values: np.ndarray, doc: np.ndarray, n_docs: int) -> np.ndarray:
    """Return the maximum of `values` per text (0 for a text without any); `doc` is non-decreasing."""
    result = np.zeros(n_docs, dtype=values.dtype)
    if len(values):
        heads = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        result[doc[heads]] = np.maximum.reduceat(values, heads)
    return result


def ngram_repetition(table: WordTable) -> dict[str, np.ndarray]:
    """Return Gopher's n-gram repetition numerators per text: rule name -> (D,) characters.

    `top_{n}gram` (n = 2, 3, 4): count x characters (inner spaces included) of
    the text's most frequent n-gram (ties: the longest); 0 when no n-gram occurs
    twice (there is no repetition to measure). `dup_{n}gram` (n = 5..10):
    characters of the words covered by an occurrence of an n-gram seen earlier
    in the same text, each word counted once ("taking care not to count
    characters in overlapping n-grams twice").

    N-grams are numbered exactly (no hashing): the code of the n-gram at a
    position combines the code of its (n-1)-gram with its last word. Only
    positions whose (n-1)-gram occurs twice can start an n-gram that occurs
    twice, so each order looks at fewer positions than the one before.
    """
    n_docs, n_words = len(table.starts) - 1, len(table.ids)
    vocab = max(len(table.uniques), 1)
    prefix = np.concatenate([[0], np.cumsum(table.lengths)])
    result: dict[str, np.ndarray] = {}
    positions = np.arange(n_words)
    codes, _ = pd.factorize(table.doc * vocab + table.ids)
    for n in range(2, max(DUP_NGRAMS) + 1):
        ends = positions + n - 1
        inside = ends < n_words
        inside[inside] = table.doc[positions[inside]] == table.doc[ends[inside]]
        positions, codes = positions[inside], codes[inside]
        codes, is_first = _first_occurrences(codes.astype(np.int64) * vocab + table.ids[positions + n - 1])
        counts = np.bincount(codes)[codes] if len(codes) else codes
        if n in TOP_NGRAMS:
            chars = prefix[positions + n] - prefix[positions] + (n - 1)
            best = _per_doc_max(counts.astype(np.int64) << 32 | chars, table.doc[positions], n_docs)
            count, length = best >> 32, best & 0xFFFFFFFF
            result[f"top_{n}gram"] = np.where(count >= 2, count * length, 0).astype(float)
        if n in DUP_NGRAMS:
            repeats = positions[~is_first]
            depth = np.cumsum(
                np.bincount(repeats, minlength=n_words + 1) - np.bincount(repeats + n, minlength=n_words + 1)
            )[:n_words]
            result[f"dup_{n}gram"] = per_doc_sum(table, table.lengths * (depth > 0))
        multi = counts >= 2
        positions, codes = positions[multi], codes[multi]
    return result


# ---------------------------------------------------------------- line and paragraph statistics


def duplicates(items: list[str]) -> tuple[int, int]:
    """Return (elements equal to an earlier one, their characters)."""
    unique = set(items)
    return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


def line_counts(text: str) -> tuple[int, int, int, int, int]:
    """Return (non-blank lines, bullet lines, ellipsis lines, terminal-punctuation lines, lines <= 30 chars)."""
    nonblank = bullets = ellipses = punct = short = 0
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            continue
        nonblank += 1
        bullets += stripped.startswith(BULLETS)
        ellipses += stripped.endswith(ELLIPSES)
        punct += line.endswith(TERMINAL_PUNCT)
        short += len(line) <= 30
    return nonblank, bullets, ellipses, punct, short


# ---------------------------------------------------------------- group scores


def gopher_quality_scores(texts: Sequence[str], table: WordTable | None = None) -> dict[str, np.ndarray]:
    """Return the Gopher quality scores of `texts`: rule name -> (D,) array."""
    table = table or word_table(texts)
    n_words = table.counts
    has_letter = np.fromiter((bool(HAS_LETTER.search(w)) for w in table.uniques), dtype=bool, count=len(table.uniques))
    is_stop = np.fromiter((w in STOP_WORDS for w in table.uniques), dtype=bool, count=len(table.uniques))
    stop_pairs = np.unique(table.doc[is_stop[table.ids]] * len(table.uniques) + table.ids[is_stop[table.ids]])
    symbols = np.array([t.count("#") + t.count("...") + t.count("…") for t in texts], dtype=float)
    lines = np.array([line_counts(t) for t in texts], dtype=float).reshape(len(texts), 5)
    return {
        "word_count": n_words.astype(float),
        "mean_word_length": _safe_div(per_doc_sum(table, table.lengths), n_words, 0.0),
        "symbol_to_word": _safe_div(symbols, n_words, np.inf),
        "bullet_lines": _safe_div(lines[:, 1], lines[:, 0], 0.0),
        "ellipsis_lines": _safe_div(lines[:, 2], lines[:, 0], 0.0),
        "alpha_words": _safe_div(per_doc_sum(table, has_letter[table.ids].astype(float)), n_words, 0.0),
        "stop_words": np.bincount(stop_pairs // max(len(table.uniques), 1), minlength=len(texts)).astype(float),
    }


def _repetition(text: str) -> tuple[float, float, float, float]:
    """Return Gopher's duplicate line and paragraph fractions of one text: (lines, paragraphs, their chars)."""
    n_chars = len(text) or 1
    paragraphs = PARAGRAPH_BREAK.split(text.strip())
    lines = LINE_BREAKS.split(text)
    para_dup, para_chars = duplicates(paragraphs)
    line_dup, line_chars = duplicates(lines)
    return line_dup / len(lines), para_dup / len(paragraphs), line_chars / n_chars, para_chars / n_chars


def gopher_repetition_scores(texts: Sequence[str], table: WordTable | None = None) -> dict[str, np.ndarray]:
    """Return the Gopher repetition scores of `texts`: rule name -> (D,) array."""
    table = table or word_table(texts)
    n_chars = np.array([len(t) for t in texts], dtype=float)
    rep = np.array([_repetition(t) for t in texts], dtype=float).reshape(len(texts), 4)
    scores = {
        "repeated_lines": rep[:, 0],
        "repeated_paragraphs": rep[:, 1],
        "repeated_lines_char": rep[:, 2],
        "repeated_paragraphs_char": rep[:, 3],
    }
    for name, chars in ngram_repetition(table).items():
        scores[name] = _safe_div(chars, n_chars, 1.0)
    return scores


def _nonblank_dup_chars(text: str) -> float:
    """Return FineWeb's character fraction of duplicated non-blank lines."""
    lines = [line for line in text.split("\n") if line.strip()]
    return duplicates(lines)[1] / max(len(text) - text.count("\n"), 1)


def fineweb_scores(texts: Sequence[str], table: WordTable | None = None) -> dict[str, np.ndarray]:
    """Return the FineWeb quality scores of `texts`: rule name -> (D,) array."""
    table = table or word_table(texts)
    lines = np.array([line_counts(t) for t in texts], dtype=float).reshape(len(texts), 5)
    newlines = np.array([t.count("\n") for t in texts], dtype=float)
    return {
        "line_punct_ratio": _safe_div(lines[:, 3], lines[:, 0], 0.0),
        "short_line_ratio": _safe_div(lines[:, 4], lines[:, 0], 1.0),
        "char_dup_ratio": np.array([_nonblank_dup_chars(t) for t in texts], dtype=float),
        "list_ratio": _safe_div(newlines, table.counts, np.inf),
    }


# ---------------------------------------------------------------- C4


@dataclasses.dataclass
class C4Result:
    """A page after C4's line cleanup: its new text, page scores and removed lines by reason."""

    text: str
    scores: dict[str, float]
    removed_lines: dict[str, int]  # line rule -> lines it removed
    citations: int  # citation markers removed


def policy_paragraph_ratio(text: str) -> float:
    """Return the fraction of paragraphs containing a policy phrase (1.0 with "lorem ipsum").

    Curator's BoilerPlateStringFilter score (its adaptation of C4's policy rule).
    """
    paragraphs = text.split("\n\n")
    lowered = [p.strip().lower() for p in paragraphs]
    if any("lorem ipsum" in p for p in lowered):
        return 1.0
    return sum(any(s in p for s in POLICY_PHRASES) for p in lowered) / len(paragraphs)


def c4_clean(text: str, cfg, skip: frozenset[str]) -> C4Result:
    """Return the page after C4's line rules, with its page-level scores.

    Line rules (each off when its name is in `skip`): a word longer than
    `c4_max_word_length` (c4_long_word), no terminal punctuation or an ellipsis
    at the end (c4_no_terminal_punct), fewer than `c4_min_words_per_line` words
    (c4_few_words), "javascript" (c4_javascript), a policy phrase (c4_policy).
    Citation markers ([1], [edit], [citation needed]) are removed first
    (c4_citations; it also removes indexing such as `a[1]` from code).
    Page scores: policy paragraph ratio and "lorem ipsum" (on the page as
    given), curly brackets and sentences (on the kept lines).
    """
    removed = dict.fromkeys(C4_LINE_RULES, 0)
    kept: list[str] = []
    sentences = citations = 0
    for raw in text.split("\n"):
        line = raw
        if C4_CITATIONS not in skip and "[" in raw:
            line, found = CITATION.subn("", raw)
            citations += found
        line = line.rstrip()
        stripped = line.strip()
        if not stripped:
            if kept and kept[-1]:
                kept.append("")  # keep paragraph breaks between kept lines
            continue
        words = stripped.split()
        lowered = stripped.lower()
        if "c4_long_word" not in skip and any(len(w) > cfg.c4_max_word_length for w in words):
            reason = "c4_long_word"
        elif "c4_no_terminal_punct" not in skip and (
            not stripped.endswith(C4_END_PUNCT) or stripped.endswith("...")
        ):
            reason = "c4_no_terminal_punct"
        elif "c4_few_words" not in skip and len(words) < cfg.c4_min_words_per_line:
            reason = "c4_few_words"
        elif "c4_javascript" not in skip and "javascript" in lowered:
            reason = "c4_javascript"
        elif "c4_policy" not in skip and any(p in lowered for p in POLICY_PHRASES):
            reason = "c4_policy"
        else:
            kept.append(line)
            sentences += len(SENTENCE_END.findall(stripped)) or 1
            continue
        removed[reason] += 1
    cleaned = "\n".join(kept).strip("\n")
    scores = {
        "boilerplate_string_ratio": policy_paragraph_ratio(text),
        "lorem_ipsum": float("lorem ipsum" in text.lower()),
        "curly_bracket": float(cleaned.count("{")),
        "c4_sentences": float(sentences),
    }
    return C4Result(cleaned, scores, removed, citations)


# ---------------------------------------------------------------- decisions


def first_failures(rules: Sequence[Rule], scores: dict[str, np.ndarray], cfg, skip: frozenset[str]) -> np.ndarray:
    """Return per document the name of the first rule it fails, or "" when it passes all, (D,) object."""
    n = len(next(iter(scores.values()))) if scores else 0
    reasons = np.full(n, "", dtype=object)
    for rule in rules:
        if rule.name in skip:
            continue
        low, high = rule.bounds(cfg)
        score = scores[rule.name]
        fails = (reasons == "") & ~((score >= low) & (score <= high))
        reasons[fails] = rule.name
    return reasons


def rule_names() -> list[str]:
    """Return the names of every document rule and C4 line rule."""
    return [r.name for rules in GROUPS.values() for r in rules] + list(C4_LINE_RULES) + [C4_CITATIONS]
