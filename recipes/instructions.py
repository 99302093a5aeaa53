"""Instruction data: "continue this passage" chats built from the curated corpus, or the user's JSONL files.

Each document with at least two sentences gives one example: the user shows
the sentences before a seeded cut point and asks for what comes next; the
assistant answers with the sentence after the cut. Whether a document is
held out depends only on (seed, document id), so the split does not move
when the corpus grows or shards are read in another order.

User files hold chat records {"messages": [...]} or instruction records
{"instruction", "input", "output"}; a line that is not a valid record becomes
a reject carrying its file, line number and reason (`read_user_instructions`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from curation.split import SplitOf, is_heldout

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


def split_sentences(text: str) -> list[str]:
    """Return the sentences of `text` with whitespace runs collapsed to single spaces."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


def clip_words(text: str, max_chars: int, keep_end: bool) -> str:
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
    context = clip_words(" ".join(sentences[:cut]), context_chars, keep_end=True)
    answer = clip_words(sentences[cut], chat_chars - context_chars, keep_end=False)
    if len(context.split()) < 3 or len(answer.split()) < 2:
        return None
    return Continuation(doc["id"], context, answer)


def continuations(docs: list[dict], seed: int, chat_chars: int) -> list[Continuation]:
    """Return the Continuation of every document that has one, in corpus order."""
    return [c for c in (continuation_of(d, seed, chat_chars) for d in docs) if c is not None]


def build_instructions(docs: list[dict], seed: int, split_of: SplitOf, chat_chars: int) -> list[dict]:
    """Return instruction records {"id", "split", "messages"}, one per usable document, split by `split_of`
    (the chain's: curation.split.Split.of; a document it drops, None, gives none)."""
    records = []
    for c in continuations(docs, seed, chat_chars):
        if split_of(c.doc_id) is None:
            continue
        prompt = random.Random(f"{seed}:prompt:{c.doc_id}").choice(PROMPTS)
        records.append(
            {
                "id": c.doc_id,
                "split": split_of(c.doc_id),
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


def select_split(records: list[dict], seed: int, max_train: int, max_val: int) -> tuple[list[dict], list[dict]]:
    """Return (train, val) records by their 'split': train shuffled by `seed` and capped by max_train
    (0: all), val capped by max_val."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    random.Random(seed).shuffle(train)
    if max_train:
        train = train[:max_train]
    return train, val[:max_val]


def check_record(record: object, where: str, kind: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a JSON object with a string 'id' and a
    'split' of SPLITS: the fields every record of ours has; `kind` names it ("an instruction record")."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: {kind} must be a JSON object")
    if not isinstance(record.get("id"), str):
        raise ValueError(f"{where}: 'id' must be a string")
    if record.get("split") not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {SPLITS}")


def check_instruction(record: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a well-formed instruction record."""
    check_record(record, where, "an instruction record")
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


def as_chat_record(record: object, where: str, default_id: str, seed: int, heldout_fraction: float) -> dict:
    """Return a user's instruction record as a checked {"id", "split", "messages"} record.

    Two shapes are read: chat `{"messages": [...]}` and Alpaca-style
    `{"instruction", "input" (optional), "output", "system" (optional)}`, whose
    user turn is the instruction, then a blank line and the input when there is
    one. `id` and `split` are optional: a record without a split is held out by
    a seeded hash of its id. Raises ValueError prefixed by `where`.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: an instruction record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
    elif "instruction" in record or "output" in record:
        messages = alpaca_messages(record, where)
    else:
        raise ValueError(f"{where}: expected 'messages' (chat) or 'instruction' and 'output' fields")
    record_id = record.get("id", default_id)
    if not isinstance(record_id, str):
        raise ValueError(f"{where}: 'id' must be a string")
    split = record.get("split", "val" if is_heldout(record_id, seed, heldout_fraction) else "train")
    converted = {"id": record_id, "split": split, "messages": messages}
    check_instruction(converted, where)
    return converted


def alpaca_messages(record: dict, where: str) -> list[dict]:
    """Return the chat of an {"instruction", "input", "output", "system"} record; ValueError prefixed by `where`."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{where}: '{key}' must be a non-empty string")
    for key in ("input", "system"):
        if not isinstance(record.get(key, ""), str):
            raise ValueError(f"{where}: '{key}' must be a string")
    extra = record.get("input", "").strip()
    user = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
    system = [{"role": "system", "content": record["system"]}] if record.get("system", "").strip() else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def read_user_instructions(paths: list[str], seed: int, heldout_fraction: float) -> tuple[list[dict], list[dict], int]:
    """Return (records, rejects, lines read) of the user's instruction JSONL files, in file order.

    A record is converted by `as_chat_record` (its default id is
    "<file stem>-<line>"). A line that is not UTF-8, not JSON or not a valid
    record becomes a reject {"file", "line", "reason", "detail", "raw"} instead
    of a record; blank lines are skipped.
    """
    records: list[dict] = []
    rejects: list[dict] = []
    lines = 0
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                lines += 1
                where = f"{path}:{lineno}"
                reject = {"file": str(path), "line": lineno, "raw": raw.decode("utf-8", "replace").rstrip("\n")}
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    rejects.append(reject | {"reason": "not_utf8", "detail": f"{where}: {exc}"})
                    continue
                except json.JSONDecodeError as exc:
                    rejects.append(reject | {"reason": "not_json", "detail": f"{where}: not JSON ({exc})"})
                    continue
                try:
                    records.append(as_chat_record(record, where, f"{Path(path).stem}-{lineno}", seed, heldout_fraction))
                except ValueError as exc:
                    rejects.append(reject | {"reason": "invalid_record", "detail": str(exc)})
    return records, rejects, lines


def check_rejects(rejects: list[dict], lines: int, max_fraction: float, where: Path) -> None:
    """Raise ValueError, quoting the first rejects, when more than `max_fraction` of `lines` were rejected."""
    if rejects and len(rejects) > max_fraction * lines:
        first = "\n  ".join(r["detail"] for r in rejects[:3])
        raise ValueError(
            f"{len(rejects)} of {lines} instruction records ({len(rejects) / lines:.1%}) are malformed, more than "
            f"sft.max_rejects_fraction={max_fraction}; all of them are in {where}. First:\n  {first}"
        )
