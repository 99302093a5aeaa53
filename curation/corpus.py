"""The curated corpus as the curate stage writes it: `corpus/shard-NNNNN.{jsonl,parquet}`.

Every stage that reads the corpus (tokenize, sft, align) reads it here, so
each `curate.output_format` gives the same records: dicts with a string "id"
and "text" and the shard's other columns ("source", ...), shards in name order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "parquet")  # curate.output_format values; the shard suffixes


def corpus_shards(directory: Path) -> list[Path]:
    """Return the `shard-*.jsonl` / `shard-*.parquet` files of `directory` in name order.

    Raises FileNotFoundError where there is none.
    """
    shards = sorted(p for p in Path(directory).glob("shard-*") if p.suffix.lstrip(".") in FORMATS)
    if not shards:
        raise FileNotFoundError(f"no shard-*.jsonl or shard-*.parquet in corpus directory {directory}")
    return shards


def _shard_rows(shard: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number from 1, record) of one shard; raise ValueError naming a line that is not JSON."""
    if shard.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(shard).to_pylist(), 1)
        return
    with open(shard, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{shard}:{lineno}: not JSON ({exc})") from None


def read_corpus(directory: Path) -> list[dict]:
    """Return the records of the corpus in `directory`, shards in name order.

    Raises ValueError naming shard and line (or row) for a record that is not
    an object with a string "id" and a string "text".
    """
    docs = []
    for shard in corpus_shards(directory):
        for n, record in _shard_rows(shard):
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("id", "text")):
                raise ValueError(f"{shard}:{n}: corpus record needs string 'id' and 'text'")
            docs.append(record)
    return docs
