"""Parse input files into documents, sending every unusable record to rejects.

Accepted inputs:

- JSON lines: `.jsonl` (also `.json`), plain or compressed `.gz` / `.zst`
  (`.zst` needs the `zstandard` package). One JSON object per line with a
  string text field. A record without an id gets `<file stem>-<line no>`
  (line numbers count from 1). Blank lines are skipped.
- Parquet (`.parquet`): one record per row; rows count as lines from 1.
- Plain text (`.txt`): the whole file is one document, id `<file stem>`.
  (One document per file, not per paragraph: paragraphs of prose are mostly
  too short to pass the word-count filter on their own.)

A record is a reject, with its reason, when its line is not valid UTF-8
(invalid_utf8) or not valid JSON (invalid_json), is not an object
(not_an_object), lacks the text field (missing_text) or has it null
(null_text) or not a string (text_not_string), when its text is empty or
blank (empty_text), or when it is longer than `max_doc_bytes` (too_large).

A directory stands for the files with these suffixes under it, sorted.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet", ".txt")
MAX_DOC_BYTES = 10_000_000
RAW_PREVIEW_BYTES = 300


@dataclasses.dataclass
class ReadResult:
    """Documents and rejects of one file. Documents carry their source `file:line`."""

    docs: list[dict[str, str]]  # {"id", "text", "source"}
    rejects: list[dict]  # {"file", "line", "reason", "detail", "raw"}
    lines: int  # records seen: non-blank lines, Parquet rows, or 1 for a .txt file


def input_suffix(path: Path) -> str | None:
    """Return the accepted suffix `path` ends with, or None."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Return the input files named by `paths` (files, or directories to search), in order.

    Raises before any work when a `.zst` input needs the missing `zstandard` package.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and input_suffix(f))
        elif p.is_file():
            if not input_suffix(p):
                raise ValueError(f"{p}: unsupported input type; use one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"curate input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files in {[str(p) for p in paths]}")
    if any(input_suffix(f).endswith(".zst") for f in files):
        _require_zstandard()
    return files


def _require_zstandard():
    """Return the zstandard module, or raise an ImportError saying how to install it."""
    try:
        import zstandard
    except ImportError:
        raise ImportError("reading .zst inputs needs the zstandard package: pip install zstandard") from None
    return zstandard


def read_file(
    path: str | Path, text_field: str = "text", id_field: str = "id", max_doc_bytes: int = MAX_DOC_BYTES
) -> ReadResult:
    """Return the documents and rejects of one input file."""
    path = Path(path)
    suffix = input_suffix(path)
    if suffix == ".txt":
        return _read_text(path, max_doc_bytes)
    if suffix == ".parquet":
        return _read_parquet(path, text_field, id_field, max_doc_bytes)
    with _open_binary(path, suffix) as f:
        return _read_jsonl(path, f, text_field, id_field, max_doc_bytes)


def _open_binary(path: Path, suffix: str) -> BinaryIO:
    """Return `path` opened for reading bytes, decompressed by its suffix."""
    if suffix.endswith(".gz"):
        return gzip.open(path, "rb")
    if suffix.endswith(".zst"):
        reader = _require_zstandard().ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _read_text(path: Path, max_doc_bytes: int) -> ReadResult:
    """Return a `.txt` file as one document (or one reject)."""
    size = path.stat().st_size
    if size > max_doc_bytes:
        with open(path, "rb") as f:
            head = f.read(RAW_PREVIEW_BYTES)
        return ReadResult([], [_reject(path, 1, "too_large", f"{size} bytes > {max_doc_bytes}", head)], 1)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ReadResult([], [_reject(path, 1, "invalid_utf8", str(exc), raw)], 1)
    if not text.strip():
        return ReadResult([], [_reject(path, 1, "empty_text", "blank file", raw)], 1)
    return ReadResult([{"id": path.stem, "text": text, "source": f"{path.name}:1"}], [], 1)


def _read_jsonl(path: Path, f: BinaryIO, text_field: str, id_field: str, max_doc_bytes: int) -> ReadResult:
    """Return the records of a JSON-lines stream; bad lines become rejects with their line number."""
    docs: list[dict[str, str]] = []
    rejects: list[dict] = []
    seen = 0
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        seen += 1
        if len(raw) > max_doc_bytes:
            rejects.append(_reject(path, number, "too_large", f"{len(raw)} bytes > {max_doc_bytes}", raw))
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            rejects.append(_reject(path, number, "invalid_utf8", str(exc), raw))
            continue
        except json.JSONDecodeError as exc:
            rejects.append(_reject(path, number, "invalid_json", str(exc), raw))
            continue
        doc, reject = _document(record, path, number, text_field, id_field, raw)
        if reject:
            rejects.append(reject)
        else:
            docs.append(doc)
    return ReadResult(docs, rejects, seen)


def _read_parquet(path: Path, text_field: str, id_field: str, max_doc_bytes: int) -> ReadResult:
    """Return the rows of a Parquet file as documents; unusable rows become rejects (line = row + 1)."""
    import pyarrow.parquet as pq

    docs: list[dict[str, str]] = []
    rejects: list[dict] = []
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    columns = [c for c in (text_field, id_field) if c in names]
    number = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        for record in batch.to_pylist():
            number += 1
            raw = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
            text = record.get(text_field)
            if isinstance(text, str) and len(text.encode("utf-8")) > max_doc_bytes:
                rejects.append(_reject(path, number, "too_large", f"> {max_doc_bytes} bytes", raw))
                continue
            doc, reject = _document(record, path, number, text_field, id_field, raw)
            if reject:
                rejects.append(reject)
            else:
                docs.append(doc)
    return ReadResult(docs, rejects, number)


def _document(
    record, path: Path, number: int, text_field: str, id_field: str, raw: bytes
) -> tuple[dict[str, str] | None, dict | None]:
    """Return (document, None) for a usable record, else (None, reject)."""
    if not isinstance(record, dict):
        return None, _reject(path, number, "not_an_object", type(record).__name__, raw)
    text = record.get(text_field)
    if text is None:
        reason = "missing_text" if text_field not in record else "null_text"
        return None, _reject(path, number, reason, f"field {text_field!r}", raw)
    if not isinstance(text, str):
        return None, _reject(path, number, "text_not_string", type(text).__name__, raw)
    if not text.strip():
        return None, _reject(path, number, "empty_text", f"field {text_field!r} is blank", raw)
    doc_id = record.get(id_field)
    doc_id = f"{path.stem}-{number}" if doc_id in (None, "") else str(doc_id)
    return {"id": doc_id, "text": text, "source": f"{path.name}:{number}"}, None


def iter_documents(paths: list[str | Path], text_field: str = "text") -> Iterator[str]:
    """Yield the text of every usable record of the files named by `paths` (rejects are skipped)."""
    for path in expand_inputs(paths):
        yield from (d["text"] for d in read_file(path, text_field).docs)


def _reject(path: Path, line: int, reason: str, detail: str, raw: bytes) -> dict:
    """Return a reject record: where, why, and the start of the offending line."""
    return {
        "file": str(path),
        "line": line,
        "reason": reason,
        "detail": detail,
        "raw": raw[:RAW_PREVIEW_BYTES].decode("utf-8", errors="replace").rstrip("\n"),
    }
