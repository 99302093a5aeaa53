"""Stage registrations and configs of the curation package (light: no heavy imports)."""

from __future__ import annotations

import dataclasses

from pipeline.stage import Stage


@dataclasses.dataclass
class CurateConfig:
    """Settings of the `curate` stage. Empty `inputs` means the corpus shipped with aigc.

    `inputs`: .jsonl / .txt files or directories of them (see curation.readers).
    `ray_address`: "" starts a fresh local Ray of `ray_cpus` CPUs; else the cluster to join.
    """

    inputs: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"
    id_field: str = "id"
    max_docs: int = 0  # 0 = all documents; else a seeded sample of this many
    max_rejects_fraction: float = 0.1  # malformed lines / input lines above this fail the stage
    min_words: int = 20  # WordCountFilter
    max_symbol_to_word_ratio: float = 0.1  # SymbolsToWordsFilter
    docs_per_shard: int = 50000
    ray_address: str = ""
    ray_cpus: int = 2


@dataclasses.dataclass
class TokenizeConfig:
    """Settings of the `tokenize` stage."""

    vocab_size: int = 4096
    valid_fraction: float = 0.05


STAGES = {
    "curate": Stage("curate", CurateConfig, "curation.curate:run", path_fields=("inputs",),
                    key_metrics=("input_lines", "rejects", "docs_out", "chars_out")),
    "tokenize": Stage("tokenize", TokenizeConfig, "curation.tokenize:run", inputs=("curate",),
                      key_metrics=("vocab_size", "train_tokens", "valid_tokens", "train_chars_per_token")),
}
