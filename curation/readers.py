"""Parse input files into documents, sending every unusable line to rejects.

Accepted inputs:

- JSONL (`.jsonl`): one JSON object per line with a string text field. A record
  without an id gets `<file stem>-<line no>` (line numbers count from 1). Blank
  lines are skipped. A line that is not valid UTF-8, not valid JSON, not an
  object, or whose text field is missing or not a string is a reject.
- Plain text (`.txt`): the whole file is one document, id `<file stem>`.
  (One document per file, not per paragraph: paragraphs of prose are mostly
  too short to pass the word-count filter on their own.)

A directory stands for the `.jsonl` and `.txt` files under it, sorted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SUFFIXES = (".jsonl", ".txt")


@dataclasses.dataclass
class ReadResult:
    """Documents and rejects of one file. Documents carry their source `file:line`."""

    docs: list[dict[str, str]]  # {"id", "text", "source"}
    rejects: list[dict]  # {"file", "line", "reason", "detail", "raw"}
    lines: int  # non-blank lines seen (or 1 for a .txt file)


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Return the input files named by `paths` (files, or directories to search), in order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"{p}: unsupported input type {p.suffix!r}; use {' or '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"curate input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no {' or '.join(SUFFIXES)} files in {[str(p) for p in paths]}")
    return files


def read_file(path: str | Path, text_field: str = "text", id_field: str = "id") -> ReadResult:
    """Return the documents and rejects of one `.jsonl` or `.txt` file."""
    path = Path(path)
    if path.suffix == ".txt":
        return _read_text(path)
    return _read_jsonl(path, text_field, id_field)


def _read_text(path: Path) -> ReadResult:
    """Return a `.txt` file as one document (or one reject if it is not UTF-8)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ReadResult([], [_reject(path, 1, "invalid_utf8", str(exc), raw)], 1)
    return ReadResult([{"id": path.stem, "text": text, "source": f"{path.name}:1"}], [], 1)


def _read_jsonl(path: Path, text_field: str, id_field: str) -> ReadResult:
    """Return the records of a JSONL file; bad lines become rejects with their line number."""
    docs: list[dict[str, str]] = []
    rejects: list[dict] = []
    seen = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            seen += 1
            try:
                record = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as exc:
                rejects.append(_reject(path, number, "invalid_utf8", str(exc), raw))
                continue
            except json.JSONDecodeError as exc:
                rejects.append(_reject(path, number, "invalid_json", str(exc), raw))
                continue
            if not isinstance(record, dict):
                rejects.append(_reject(path, number, "not_an_object", type(record).__name__, raw))
                continue
            text = record.get(text_field)
            if text is None:
                reason = "missing_text" if text_field not in record else "null_text"
                rejects.append(_reject(path, number, reason, f"field {text_field!r}", raw))
                continue
            if not isinstance(text, str):
                rejects.append(_reject(path, number, "text_not_string", type(text).__name__, raw))
                continue
            doc_id = record.get(id_field)
            doc_id = f"{path.stem}-{number}" if doc_id in (None, "") else str(doc_id)
            docs.append({"id": doc_id, "text": text, "source": f"{path.name}:{number}"})
    return ReadResult(docs, rejects, seen)


def _reject(path: Path, line: int, reason: str, detail: str, raw: bytes) -> dict:
    """Return a reject record: where, why, and the start of the offending line."""
    return {
        "file": str(path),
        "line": line,
        "reason": reason,
        "detail": detail,
        "raw": raw[:300].decode("utf-8", errors="replace").rstrip("\n"),
    }
