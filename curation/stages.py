"""Stage registrations and configs of the curation package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class CurateConfig:
    """Settings of the `curate` stage. Empty `inputs` means the corpus shipped with aigc.

    `inputs`: .jsonl[.gz|.zst] / .parquet / .txt files or directories of them (see curation.readers).
    `executor`: "auto" runs the Curator pipeline on `workers` local processes when `ray_address` is empty and
    on the Ray cluster at `ray_address` otherwise; "ray" always uses Ray ("" = a fresh local Ray of `ray_cpus`
    CPUs); "processes" always uses local processes (curation.process_executor: no Ray start, no object store).
    Quality rule thresholds default to their papers' values (see curation.heuristics);
    `skip_rules` turns rules off by name (e.g. `curate.skip_rules=curly_bracket,c4_no_terminal_punct`).
    """

    inputs: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"
    id_field: str = "id"
    max_doc_bytes: int = 10_000_000  # a longer record is a reject (too_large)
    max_docs: int = 0  # 0 = all documents; else a seeded sample of this many
    max_rejects_fraction: float = 0.1  # malformed records / input records above this fail the stage
    docs_per_batch: int = 1000  # documents per Curator task after reading
    docs_per_shard: int = 50000
    output_format: str = "jsonl"  # jsonl | parquet
    executor: str = "auto"  # auto | ray | processes
    workers: int = 2  # worker processes of the processes executor
    ray_address: str = ""
    ray_cpus: int = 2
    # cleaning
    fix_unicode: bool = True  # ftfy repair + NFC
    strip_markup: bool = True  # HTML tags, comments, script/style blocks, entities
    remove_urls: bool = False
    # language id (lingua); empty `languages` keeps every language and skips the stage
    languages: list[str] = dataclasses.field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep
    min_language_score: float = 0.5  # lingua confidence of the detected language
    # language id and the Gopher / FineWeb rules judge the prose of a document, not its code blocks,
    # doctests and their output (curation.prose); off = they judge every line, as the papers' web text had none
    code_aware: bool = True
    # heuristic rule groups, in order, and rules turned off by name
    rule_groups: list[str] = dataclasses.field(
        default_factory=lambda: ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    )
    # rules whose premise fails on hard-wrapped technical text with code and tables (the shipped corpus):
    # on it they would cut code (lines, `a[1]`) or drop 7-14% of good documents each; FineWeb's list and
    # short-line rules drop 6% of library docstrings (parameter lists, "See Also") and no junk of the
    # evaluation corpus (curation.quality_eval); `curate.skip_rules=` runs all
    skip_rules: list[str] = dataclasses.field(
        default_factory=lambda: [
            "curly_bracket",
            "c4_no_terminal_punct",
            "c4_few_words",
            "c4_citations",
            "line_punct_ratio",
            "char_dup_ratio",
            "list_ratio",
            "short_line_ratio",
        ]
    )
    # Gopher quality (Rae et al. 2021)
    gopher_min_words: int = 50
    gopher_max_words: int = 100_000
    gopher_min_mean_word_length: float = 3.0
    gopher_max_mean_word_length: float = 10.0
    gopher_max_symbol_word_ratio: float = 0.1
    gopher_max_bullet_lines: float = 0.9
    gopher_max_ellipsis_lines: float = 0.3
    gopher_min_alpha_words: float = 0.8
    gopher_min_stop_words: int = 2
    # Gopher repetition (Rae et al. 2021, table A1)
    gopher_max_dup_line_frac: float = 0.3
    gopher_max_dup_para_frac: float = 0.3
    gopher_max_dup_line_char_frac: float = 0.2
    gopher_max_dup_para_char_frac: float = 0.2
    gopher_max_top_2gram: float = 0.20
    gopher_max_top_3gram: float = 0.18
    gopher_max_top_4gram: float = 0.16
    gopher_max_dup_5gram: float = 0.15
    gopher_max_dup_6gram: float = 0.14
    gopher_max_dup_7gram: float = 0.13
    gopher_max_dup_8gram: float = 0.12
    gopher_max_dup_9gram: float = 0.11
    gopher_max_dup_10gram: float = 0.10
    # C4 (Raffel et al. 2020, thresholds of tfds c4_utils)
    c4_max_policy_paragraphs: float = 0.4  # Curator's boilerplate-paragraph ratio
    c4_max_curly_brackets: int = 0
    c4_min_sentences: int = 5
    c4_min_words_per_line: int = 3
    c4_max_word_length: int = 1000
    # FineWeb (Penedo et al. 2024)
    fineweb_min_line_punct: float = 0.12
    fineweb_max_short_lines: float = 0.67  # lines of <= 30 characters
    fineweb_max_char_dup: float = 0.01
    fineweb_max_newlines_per_word: float = 0.3
    # PII redaction: kinds of email, phone, ip_address, credit_card (empty = off); {kind} = EMAIL, ...
    pii_kinds: list[str] = dataclasses.field(default_factory=lambda: ["email", "phone", "ip_address", "credit_card"])
    pii_replacement: str = "<{kind}>"
    # decontamination: drop documents sharing a word n-gram with the texts of these files
    decontam_paths: list[str] = dataclasses.field(default_factory=list)
    decontam_ngram: int = 13
    # quality classifier (hashed n-gram logistic regression), on when both sets are given
    quality_good: list[str] = dataclasses.field(default_factory=list)
    quality_bad: list[str] = dataclasses.field(default_factory=list)
    quality_min_score: float = 0.5  # P(good) below this drops the document
    quality_ngram: int = 2
    # fuzzy dedup: MinHash over word n-grams, LSH with bands x rows, pairs verified by estimated Jaccard
    fuzzy_dedup: bool = True
    minhash_ngram: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8
    minhash_threshold: float = 0.5  # estimated Jaccard a candidate pair needs; 0 = every LSH candidate
    minhash_seed: int = 42
@dataclasses.dataclass
class TokenizeConfig:
    """Settings of the `tokenize` stage."""

    vocab_size: int = 4096
    # the chain's one held-out split (curation.split): this share of documents, by a seeded hash of their ids;
    # SFT and alignment data built from the corpus follow it, evaluate scores only these documents
    valid_fraction: float = 0.1


STAGES = {
    "curate": Stage(
        "curate",
        CurateConfig,
        "curation.curate:run",
        path_fields=("inputs", "decontam_paths", "quality_good", "quality_bad"),
        key_metrics=("input_lines", "rejects", "docs_out", "chars_out"),
    ),
    "tokenize": Stage("tokenize", TokenizeConfig, "curation.tokenize:run", inputs=("curate",),
                      key_metrics=("vocab_size", "train_tokens", "valid_tokens", "train_chars_per_token")),
}

# Named configs: this package's overrides (tiny = the dataclass defaults).
PRESETS = {"tiny": [], "smoke": ["curate.max_docs=400", "tokenize.vocab_size=512"]}
