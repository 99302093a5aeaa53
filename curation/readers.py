"""Parse input files into documents, sending every unusable record to rejects.

Accepted inputs:

- JSON lines: `.jsonl` (also `.json`), plain or compressed `.gz` / `.zst`
  (`.zst` needs the `zstandard` package; a file may hold several frames).
  One JSON object per line with a string text field. A record without an id
  gets `<file stem>-<line no>` (line numbers count from 1). Blank lines are
  skipped.
- Parquet (`.parquet`): one record per row; rows count as lines from 1.
- Plain text (`.txt`): the whole file is one document, id `<file stem>`.
  (One document per file, not per paragraph: paragraphs of prose are mostly
  too short to pass the word-count filter on their own.)

A record is a reject, with its reason, when its line is not valid UTF-8
(invalid_utf8) or not valid JSON (invalid_json), is not an object
(not_an_object), lacks the text field (missing_text) or has it null
(null_text) or not a string (text_not_string), when its text is empty or
blank (empty_text), when its text or id holds a lone surrogate (a `\\udXXX`
escape JSON accepts but UTF-8 cannot encode: unencodable_text /
unencodable_id), or when it is longer than `max_doc_bytes` (too_large; the
line is skipped without holding more than `max_doc_bytes` of it in memory).
A UTF-8 BOM at the start of a file is dropped; CR, LF and CRLF all end a line.
A file that cannot be read to its end (a truncated or corrupt `.gz`/`.zst`,
a broken Parquet file) keeps the records read before the damage and adds one
reject (unreadable_file) for the rest.

A directory stands for the files with these suffixes under it, sorted.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet", ".txt")
MAX_DOC_BYTES = 10_000_000
RAW_PREVIEW_BYTES = 300
SKIP_CHUNK_BYTES = 1 << 20
ZSTD_CHUNK_BYTES = 1 << 14  # compressed bytes decompressed at a time
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
# what a damaged compressed stream or Parquet file raises while being read
READ_ERRORS = (EOFError, OSError, zlib.error, ValueError)


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
        return io.BufferedReader(_ZstdFile(path))
    return open(path, "rb")


class _ZstdFile(io.RawIOBase):
    """The decompressed bytes of a `.zst` file, frame after frame.

    Reading raises EOFError when the file ends inside a frame (truncated; zstandard's
    own stream reader just stops there) and OSError when the bytes are not zstd
    frames, as `gzip` does for a `.gz` file. Compressed bytes are decompressed
    `ZSTD_CHUNK_BYTES` at a time.
    """

    def __init__(self, path: Path):
        self._zstd = _require_zstandard()
        self._file = open(path, "rb")
        self._frame = None  # decompressor of the frame being read; None between frames
        self._pending = memoryview(b"")  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        """Fill `buffer` with decompressed bytes; return how many, 0 at the end of the file."""
        while not self._pending:
            data = self._file.read(ZSTD_CHUNK_BYTES)
            if not data:
                if self._frame is not None:
                    raise EOFError("compressed file ended before the end of its zstd frame")
                return 0
            self._pending = memoryview(self._decompress(data))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        """Return the decompressed bytes of `data`, which may end one frame and start the next."""
        out = []
        while data:
            if self._frame is None:
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except self._zstd.ZstdError as exc:
                raise OSError(f"not a valid zstd file: {exc}") from None
            data = b""
            if self._frame.eof:
                data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


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
    return ReadResult([{"id": _printable(path.stem), "text": text, "source": f"{_printable(path.name)}:1"}], [], 1)


def _lines(f: BinaryIO, max_doc_bytes: int) -> Iterator[bytes | tuple[int, bytes]]:
    """Yield the lines of `f` (CR, LF or CRLF ended, BOM dropped); for a line over `max_doc_bytes`, (length, head).

    A long line is skipped in chunks, never held whole in memory.
    """
    first = True
    while True:
        raw = f.readline(max_doc_bytes + 1)
        if not raw:
            return
        if first and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        first = False
        if len(raw.rstrip(b"\r\n")) > max_doc_bytes:
            size, head = len(raw), raw[:RAW_PREVIEW_BYTES]
            while not raw.endswith(b"\n"):
                raw = f.readline(SKIP_CHUNK_BYTES)
                if not raw:
                    break
                size += len(raw)
            yield size, head
            continue
        if b"\r" in raw.rstrip(b"\r\n"):
            yield from _LINE_ENDS.split(raw.rstrip(b"\r\n"))
        else:
            yield raw


def _read_jsonl(path: Path, f: BinaryIO, text_field: str, id_field: str, max_doc_bytes: int) -> ReadResult:
    """Return the records of a JSON-lines stream; bad lines become rejects with their line number."""
    docs: list[dict[str, str]] = []
    rejects: list[dict] = []
    seen = number = 0
    lines = _lines(f, max_doc_bytes)
    while True:
        try:
            raw = next(lines, None)
        except READ_ERRORS as exc:  # truncated or corrupt compressed file: keep what came before
            seen += 1
            rejects.append(_reject(path, number + 1, "unreadable_file", f"{type(exc).__name__}: {exc}", b""))
            break
        if raw is None:
            break
        number += 1
        if isinstance(raw, tuple):
            seen += 1
            size, head = raw
            rejects.append(_reject(path, number, "too_large", f"{size} bytes > {max_doc_bytes}", head))
            continue
        if not raw.strip():
            continue
        seen += 1
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            rejects.append(_reject(path, number, "invalid_utf8", str(exc), raw))
            continue
        except (json.JSONDecodeError, RecursionError) as exc:
            rejects.append(_reject(path, number, "invalid_json", f"{type(exc).__name__}: {exc}", raw))
            continue
        _add(docs, rejects, *_document(record, path, number, text_field, id_field, raw))
    return ReadResult(docs, rejects, seen)


def _read_parquet(path: Path, text_field: str, id_field: str, max_doc_bytes: int) -> ReadResult:
    """Return the rows of a Parquet file as documents; unusable rows become rejects (line = row + 1)."""
    import pyarrow.parquet as pq

    docs: list[dict[str, str]] = []
    rejects: list[dict] = []
    number = 0
    try:
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        columns = [c for c in (text_field, id_field) if c in names]
        batches = list(parquet.iter_batches(batch_size=4096, columns=columns))
    except READ_ERRORS as exc:  # not a Parquet file, or a damaged one (pyarrow errors are these)
        return ReadResult([], [_reject(path, 1, "unreadable_file", f"{type(exc).__name__}: {exc}", b"")], 1)
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            raw = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
            text = record.get(text_field)
            if isinstance(text, str) and len(text.encode("utf-8")) > max_doc_bytes:
                rejects.append(_reject(path, number, "too_large", f"> {max_doc_bytes} bytes", raw))
                continue
            _add(docs, rejects, *_document(record, path, number, text_field, id_field, raw))
    return ReadResult(docs, rejects, number)


def _add(docs: list[dict[str, str]], rejects: list[dict], doc: dict[str, str] | None, reject: dict | None) -> None:
    """Append a record's document to `docs`, or its reject to `rejects`."""
    if reject:
        rejects.append(reject)
    else:
        docs.append(doc)


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
    if not _encodable(text):
        return None, _reject(path, number, "unencodable_text", f"field {text_field!r}: {_surrogate(text)}", raw)
    doc_id = record.get(id_field)
    doc_id = f"{_printable(path.stem)}-{number}" if doc_id in (None, "") else str(doc_id)
    if not _encodable(doc_id):
        return None, _reject(path, number, "unencodable_id", f"field {id_field!r}: {_surrogate(doc_id)}", raw)
    return {"id": doc_id, "text": text, "source": f"{_printable(path.name)}:{number}"}, None


def _encodable(text: str) -> bool:
    """Return True when `text` can be written as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """Return a file name as UTF-8 can hold it (a non-UTF-8 name's bytes become `?`)."""
    return name.encode("utf-8", "replace").decode("utf-8")


def _surrogate(text: str) -> str:
    """Return where the first character UTF-8 cannot encode is, e.g. `lone surrogate \\ud800 at 3`."""
    pos = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    return f"lone surrogate \\u{ord(text[pos]):04x} at character {pos}"


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
