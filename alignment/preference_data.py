"""Preference pairs built from the curated corpus: the real continuation of a passage beats a corrupted one.

The prompt asks to continue a passage (the same chats as recipes.instructions);
`chosen` is the sentence that really follows; `rejected` is that sentence with
its words shuffled ("shuffled") or the continuation of another document
("unrelated"). Pairs are in TRL's conversational preference format, seeded,
with a held-out split decided per document.

User files hold one pair a line, in text form {"prompt": str, "chosen": str,
"rejected": str} or chat form (prompt a list of messages, chosen/rejected a
list of one assistant message), with optional "id" and "split"; a pair
without a split is held out by the same seeded hash of its id.
"""

from __future__ import annotations

import random
from pathlib import Path

from curation.split import SplitOf, is_heldout
from recipes.instructions import PROMPTS, check_messages, check_record, continuations, read_jsonl

REJECTED_KINDS = ("shuffled", "unrelated")


def shuffled_words(text: str, rng: random.Random) -> str | None:
    """Return `text` with its words in a seeded new order, or None where no order differs."""
    words = text.split()
    if len(set(words)) < 2:
        return None
    order = words[:]
    while order == words:
        rng.shuffle(order)
    return " ".join(order)


def build_pairs(docs: list[dict], seed: int, split_of: SplitOf, rejected: str, chat_chars: int) -> list[dict]:
    """Return preference records {"id", "split", "prompt", "chosen", "rejected"}, one per usable document,
    split by `split_of` (as build_instructions); an "unrelated" rejected answer comes from another document
    of the same split."""
    if rejected not in REJECTED_KINDS:
        raise ValueError(f"unknown rejected kind {rejected!r}; choose from {REJECTED_KINDS}")
    items = [c for c in continuations(docs, seed, chat_chars) if split_of(c.doc_id) is not None]
    same_split = {s: [c for c in items if split_of(c.doc_id) == s] for s in ("train", "val")}
    pairs = []
    for c in items:
        rng = random.Random(f"{seed}:pair:{c.doc_id}")
        others = [o for o in same_split[split_of(c.doc_id)] if o.doc_id != c.doc_id]
        if rejected == "shuffled":
            bad = shuffled_words(c.continuation, rng)
        elif others:
            other = others[rng.randrange(len(others))].continuation  # another document of the same split
            bad = other if other != c.continuation else None
        else:
            bad = None
        if bad is None:
            continue
        prompt = rng.choice(PROMPTS).format(context=c.context)
        pairs.append(
            {
                "id": c.doc_id,
                "split": split_of(c.doc_id),
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": c.continuation}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return pairs


def check_pair(record: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a well-formed preference record."""
    check_record(record, where, "a preference record")
    prompt = record.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a non-empty list of messages")
    for key in ("chosen", "rejected"):
        answer = record.get(key)
        if not isinstance(answer, list) or len(answer) != 1:
            raise ValueError(f"{where}: '{key}' must be a list of one assistant message")
        check_messages(prompt + answer, f"{where} ({key})")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: 'prompt' must not end with an assistant message")
    if record["chosen"] == record["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same answer")


def as_chat_pair(record: object, where: str, default_id: str, seed: int, heldout_fraction: float) -> dict:
    """Return a user's pair (text or chat form) as a checked preference record; ValueError prefixed by `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a preference pair must be a JSON object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    pair_id = record.get("id", default_id)
    if not isinstance(pair_id, str):
        raise ValueError(f"{where}: 'id' must be a string")
    prompt = record["prompt"]
    converted = {
        "id": pair_id,
        "split": record.get("split", "val" if is_heldout(pair_id, seed, heldout_fraction) else "train"),
        "prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
    }
    for key in ("chosen", "rejected"):
        answer = record[key]
        converted[key] = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    check_pair(converted, where)
    return converted


def read_user_pairs(paths: list[str], seed: int, heldout_fraction: float) -> list[dict]:
    """Return the preference records of the user's JSONL files (text or chat form), in file order.

    A pair without an id gets "<file stem>-<index in its file>". Raises
    ValueError naming file and line of the first malformed pair.
    """
    pairs: list[dict] = []
    for path in paths:
        stem, start = Path(path).stem, len(pairs)

        def convert(record: object, where: str) -> None:
            default_id = f"{stem}-{len(pairs) - start}"
            pairs.append(as_chat_pair(record, where, default_id, seed, heldout_fraction))

        read_jsonl(Path(path), convert)
    return pairs


def read_pairs(path: Path) -> list[dict]:
    """Return the preference records of a JSONL file, checking each (ValueError names the line)."""
    return read_jsonl(path, check_pair)
