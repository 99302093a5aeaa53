"""The one table that configures both sides of the curation comparison (aigc and datatrove) identically.

Each row is one setting of the standard chain: its value, the `curate.` field
that takes it in aigc, and the datatrove filter argument that takes it. Both
`curate_throughput.py` (aigc's venv) and `datatrove_chain.py` (datatrove's venv)
import this module, so it uses nothing but the standard library.

What cannot be a row, and is made the same by other means:
- words are whitespace-separated tokens on both sides: aigc's definition
  (Curator's English splitter); datatrove's filters get `str.split` in place of
  its spaCy tokenizer (`datatrove_chain.py --words whitespace`), which also
  makes datatrove faster than with spaCy;
- lines are split at "\\n" on both sides (datatrove's C4 `split_paragraph=True`);
- cleaning is ftfy on both sides: aigc's markup stripping and URL removal are off;
- the rules judge every line on both sides: aigc's code-aware mode (prose only) is off;
- rules one side has and the other lacks are off: aigc's page-level boilerplate
  paragraph ratio (Curator's, not datatrove's), and with `minhash_threshold=0`
  aigc keeps every LSH candidate pair, as datatrove does.
"""

from __future__ import annotations

GQ, GR, C4, FW, MH = ("GopherQualityFilter", "GopherRepetitionFilter", "C4QualityFilter", "FineWebQualityFilter",
                      "MinhashConfig")

# (setting, value, aigc `curate.` field or None, (datatrove class, argument[, n-gram order]) or None)
ROWS: tuple[tuple[str, object, str | None, tuple | None], ...] = (
    ("Gopher quality: min words", 50, "gopher_min_words", (GQ, "min_doc_words")),
    ("Gopher quality: max words", 100_000, "gopher_max_words", (GQ, "max_doc_words")),
    ("Gopher quality: min mean word length", 3, "gopher_min_mean_word_length", (GQ, "min_avg_word_length")),
    ("Gopher quality: max mean word length", 10, "gopher_max_mean_word_length", (GQ, "max_avg_word_length")),
    ("Gopher quality: max symbol/word ratio", 0.1, "gopher_max_symbol_word_ratio", (GQ, "max_symbol_word_ratio")),
    ("Gopher quality: max bullet lines", 0.9, "gopher_max_bullet_lines", (GQ, "max_bullet_lines_ratio")),
    ("Gopher quality: max ellipsis lines", 0.3, "gopher_max_ellipsis_lines", (GQ, "max_ellipsis_lines_ratio")),
    # datatrove's argument name says "non alpha" but it is the minimum share of words with a letter
    ("Gopher quality: min words with a letter", 0.8, "gopher_min_alpha_words", (GQ, "max_non_alpha_words_ratio")),
    ("Gopher quality: min stop words", 2, "gopher_min_stop_words", (GQ, "min_stop_words")),
    ("Gopher repetition: max duplicate lines", 0.3, "gopher_max_dup_line_frac", (GR, "dup_line_frac")),
    ("Gopher repetition: max duplicate paragraphs", 0.3, "gopher_max_dup_para_frac", (GR, "dup_para_frac")),
    ("Gopher repetition: max duplicate line chars", 0.2, "gopher_max_dup_line_char_frac", (GR, "dup_line_char_frac")),
    ("Gopher repetition: max duplicate paragraph chars", 0.2, "gopher_max_dup_para_char_frac",
     (GR, "dup_para_char_frac")),
    *((f"Gopher repetition: max top {n}-gram chars", v, f"gopher_max_top_{n}gram", (GR, "top_n_grams", n))
      for n, v in ((2, 0.2), (3, 0.18), (4, 0.16))),
    *((f"Gopher repetition: max duplicate {n}-gram chars", v, f"gopher_max_dup_{n}gram", (GR, "dup_n_grams", n))
      for n, v in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.1))),
    ("C4: min sentences", 5, "c4_min_sentences", (C4, "min_num_sentences")),
    ("C4: min words per line", 3, "c4_min_words_per_line", (C4, "min_words_per_line")),
    ("C4: max word length", 1000, "c4_max_word_length", (C4, "max_word_length")),
    ("C4: lines without terminal punctuation, citations, javascript, policy lines; lorem ipsum, curly brackets",
     True, None, (C4, "all line and page rules on")),
    ("FineWeb: min lines ending in punctuation", 0.12, "fineweb_min_line_punct", (FW, "line_punct_thr")),
    ("FineWeb: max short lines (<= 30 chars)", 0.67, "fineweb_max_short_lines", (FW, "short_line_thr")),
    ("FineWeb: max chars in duplicated lines", 0.01, "fineweb_max_char_dup", (FW, "char_duplicates_ratio")),
    ("FineWeb: max newlines per word", 0.3, "fineweb_max_newlines_per_word", (FW, "new_line_ratio")),
    ("MinHash: word n-gram", 5, "minhash_ngram", (MH, "n_grams")),
    ("MinHash: bands", 14, "minhash_bands", (MH, "num_buckets")),
    ("MinHash: rows per band", 8, "minhash_rows", (MH, "hashes_per_bucket")),
    ("MinHash: verify candidate pairs (0 = keep all, as datatrove)", 0.0, "minhash_threshold", None),
)

# aigc settings outside the rows: the standard chain only (no language id, PII, decontamination or classifier),
# every rule on except the one datatrove lacks, cleaning = ftfy only, all documents in one output shard
AIGC_CHAIN = [
    "curate.languages=",
    "curate.pii_kinds=",
    "curate.skip_rules=boilerplate_string_ratio",
    "curate.strip_markup=false",
    "curate.remove_urls=false",
    "curate.fix_unicode=true",
    "curate.code_aware=false",  # datatrove's rules judge every line
    "curate.max_docs=0",
    "curate.docs_per_shard=1000000",
]


def aigc_overrides() -> list[str]:
    """Return the `curate.key=value` overrides that configure aigc's curate stage as the table says."""
    values = [f"curate.{field}={value}" for _, value, field, _ in ROWS if field]
    return AIGC_CHAIN + values


def datatrove_arguments() -> dict[str, dict]:
    """Return datatrove's constructor arguments per class name, as the table says."""
    args: dict[str, dict] = {GQ: {}, GR: {"top_n_grams": [], "dup_n_grams": []}, C4: {"split_paragraph": True},
                             FW: {"short_line_length": 30}, MH: {}}
    for _, value, _, target in ROWS:
        if target is None or target[1].startswith("all "):
            continue
        cls, arg, *order = target
        if order:
            args[cls][arg].append((order[0], value))
        else:
            args[cls][arg] = value
    args[GR] = {k: tuple(v) if isinstance(v, list) else v for k, v in args[GR].items()}
    return args


def rows_for_display() -> list[tuple[str, str, str, str]]:
    """Return the table as (setting, value, aigc field, datatrove argument) strings."""
    out = []
    for setting, value, field, target in ROWS:
        dt = "-" if target is None else f"{target[0]}.{target[1]}" + (f"[{target[2]}]" if len(target) > 2 else "")
        out.append((setting, str(value), f"curate.{field}" if field else "(defaults)", dt))
    return out
