"""Instruction data built from the curated corpus: "continue this passage" chats, seeded and split.

Each document with at least two sentences gives one example: the user shows
the sentences before a seeded cut point and asks for what comes next; the
assistant answers with the sentence after the cut. Whether a document is
held out depends only on (seed, document id), so the split does not move
when the corpus grows or shards are read in another order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

PROMPTS = (
    "Continue this text:\n{context}",
    "Write the next sentence of this passage:\n{context}",
    "What comes next?\n{context}",
)
MAX_CHAT_CHARS = 320  # context + answer characters of a chat, at most
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(*])")


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A passage cut in two: the context shown and the sentence that really follows it."""

    doc_id: str
    context: str
    continuation: str


def read_corpus(directory: Path) -> list[dict]:
    """Return the {"id", "text"} records of every `*.jsonl` shard in `directory`, shards in name order.

    Raises ValueError naming file and line for a record that is not a JSON
    object with a string id and a string text.
    """
    shards = sorted(Path(directory).glob("*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"no *.jsonl shards in corpus directory {directory}")
    docs = []
    for shard in shards:
        with open(shard) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{shard}:{lineno}: not JSON ({exc})") from None
                if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("id", "text")):
                    raise ValueError(f"{shard}:{lineno}: corpus record needs string 'id' and 'text'")
                docs.append(record)
    return docs


def split_sentences(text: str) -> list[str]:
    """Return the sentences of `text` with whitespace runs collapsed to single spaces."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


def _clip_words(text: str, max_chars: int, keep_end: bool) -> str:
    """Return `text` cut at a word boundary to at most `max_chars` (keeping its start or its end)."""
    if len(text) <= max_chars:
        return text
    words = text.split(" ")
    kept: list[str] = []
    for word in reversed(words) if keep_end else words:
        if sum(len(w) + 1 for w in kept) + len(word) > max_chars:
            break
        kept.append(word)
    return " ".join(reversed(kept) if keep_end else kept)


def chat_char_budget(max_tokens: int) -> int:
    """Return the context + answer characters to aim for in a chat of at most `max_tokens` tokens.

    Byte-level BPE averages over 2 characters a token on English even with
    small vocabularies, so 1.5 characters a token leaves room for the template
    and the request; chats that still do not fit are dropped by the stages.
    """
    return min(MAX_CHAT_CHARS, 3 * max_tokens // 2)


def continuation_of(doc: dict, seed: int, chat_chars: int) -> Continuation | None:
    """Return the seeded Continuation of one document, or None where it has no usable cut.

    The context gets 5/8 of `chat_chars` (its last words kept), the answer the
    rest (its first words kept).
    """
    sentences = split_sentences(doc["text"])
    if len(sentences) < 2:
        return None
    rng = random.Random(f"{seed}:{doc['id']}")
    cut = rng.randint(1, len(sentences) - 1)
    context_chars = chat_chars * 5 // 8
    context = _clip_words(" ".join(sentences[:cut]), context_chars, keep_end=True)
    answer = _clip_words(sentences[cut], chat_chars - context_chars, keep_end=False)
    if len(context.split()) < 3 or len(answer.split()) < 2:
        return None
    return Continuation(doc["id"], context, answer)


def is_heldout(doc_id: str, seed: int, fraction: float) -> bool:
    """Return True where document `doc_id` belongs to the held-out split (a seeded hash decides)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def continuations(docs: list[dict], seed: int, chat_chars: int) -> list[Continuation]:
    """Return the Continuation of every document that has one, in corpus order."""
    return [c for c in (continuation_of(d, seed, chat_chars) for d in docs) if c is not None]


def build_instructions(docs: list[dict], seed: int, heldout_fraction: float, chat_chars: int) -> list[dict]:
    """Return instruction records {"id", "split", "messages"} (one per usable document)."""
    records = []
    for c in continuations(docs, seed, chat_chars):
        prompt = random.Random(f"{seed}:prompt:{c.doc_id}").choice(PROMPTS)
        records.append(
            {
                "id": c.doc_id,
                "split": "val" if is_heldout(c.doc_id, seed, heldout_fraction) else "train",
                "messages": [
                    {"role": "user", "content": prompt.format(context=c.context)},
                    {"role": "assistant", "content": c.continuation},
                ],
            }
        )
    return records


def check_messages(messages: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `messages` is a chat ending in an assistant answer."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{where}: message {i} needs a 'role' among {ROLES}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"{where}: message {i} needs non-empty string 'content'")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: the chat opens with an assistant turn, which answers no prompt")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer")


def check_instruction(record: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a well-formed instruction record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: an instruction record must be a JSON object")
    if not isinstance(record.get("id"), str):
        raise ValueError(f"{where}: 'id' must be a string")
    if record.get("split") not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {SPLITS}")
    check_messages(record.get("messages"), where)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write `records` one JSON object per line; return `path`."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path, check: Callable[[object, str], None]) -> list[dict]:
    """Return the records of a JSONL file, each passed through `check(record, "file:line")`.

    Raises ValueError naming the line of the first record that is not JSON or fails `check`.
    """
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc})") from None
            check(record, where)
            records.append(record)
    return records


def read_instructions(path: Path) -> list[dict]:
    """Return the instruction records of a JSONL file, checking each (ValueError names the line)."""
    return read_jsonl(path, check_instruction)
