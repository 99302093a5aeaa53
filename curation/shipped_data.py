"""The corpus shipped with aigc: where it lives, and how it was generated.

Two committed JSONL files under `curation/data/`:

- `pydoc_topics.jsonl`: English text from Python's own `pydoc_data.topics`
  (79 topics). Each topic is split at blank lines into paragraph groups of
  about `TARGET_CHARS` characters, one document each, with ids
  `pydoc-<topic>-<k>` (k counts from 0 within the topic).
- `noise.jsonl`: planted noise so curation visibly does something: exact
  duplicates of pydoc documents that differ only in whitespace or Unicode form
  (or mojibake that ftfy repairs), boilerplate, symbol junk, repeated lines,
  too-short and empty documents, records without an `id`, PII, a German
  text, an HTML page, a near-duplicate (2% of words edited), and malformed lines.

Regenerate both with `python -m curation.shipped_data` (the pydoc text is that
of the Python that runs it; the committed files came from Python 3.11.7).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
PYDOC_FILE = DATA_DIR / "pydoc_topics.jsonl"
NOISE_FILE = DATA_DIR / "noise.jsonl"
TARGET_CHARS = 800  # a document closes once its paragraphs reach this many characters
MIN_TAIL_CHARS = 400  # a shorter last group of a topic joins the document before it


def shipped_inputs() -> list[Path]:
    """Return the shipped corpus files, the default inputs of the `curate` stage."""
    return [PYDOC_FILE, NOISE_FILE]


def pydoc_documents() -> list[dict[str, str]]:
    """Return the pydoc topics as {"id", "text"} documents of paragraph groups."""
    from pydoc_data.topics import topics

    docs: list[dict[str, str]] = []
    for topic in sorted(topics):
        groups: list[str] = []
        current: list[str] = []
        for paragraph in topics[topic].split("\n\n"):
            current.append(paragraph)
            if sum(len(p) for p in current) >= TARGET_CHARS:
                groups.append("\n\n".join(current))
                current = []
        if current:
            tail = "\n\n".join(current)
            if len(tail) < MIN_TAIL_CHARS and groups:
                groups[-1] += "\n\n" + tail
            else:
                groups.append(tail)
        docs += [{"id": f"pydoc-{topic}-{k}", "text": text} for k, text in enumerate(groups)]
    return docs


_BOILERPLATE = (
    "Click here to subscribe to our newsletter and never miss an update from our team!\n\n"
    "This website uses cookies to improve your experience. By continuing to browse the site "
    "you agree to our use of cookies. Read our cookie policy and privacy policy for details.\n\n"
    "All rights reserved. Please review our terms of use before sharing any of the content "
    "found on these pages with your friends, colleagues or anybody else at all.\n\n"
    "Privacy overview: we use cookies to remember your preferences and to show offers."
)
_SYMBOL_JUNK = " ".join(["#### ... $$$ # %%% ... &&& # @@"] * 12)
_REPEATED = "\n".join(["BUY NOW!!! Limited offer, only today, do not miss it."] * 30)
_CAFE = (
    "The café on the corner serves a naïve little crème brûlée that every visitor to the "
    "old quarter seems to recommend. Its owner, a retired professor of linguistics, likes to "
    "explain how accents and combining marks are stored in Unicode, and why two strings that "
    "look identical on screen can still differ byte by byte until they are normalized. "
    "She keeps a small card behind the counter with the word written four different ways. "
    "Visitors rarely notice the difference, but search engines and databases certainly do. "
    "That is why careful pipelines normalize text before they compare or count anything."
)
_NO_ID = (
    "Curation turns raw text into training data. A reader parses each record, cleaning repairs "
    "broken Unicode and stray whitespace, heuristic filters drop documents that look like junk, "
    "and deduplication keeps one copy of each text. Every step reports how many documents it "
    "received and how many it kept, so that nothing disappears without a trace. Rejected "
    "records are written out with the reason they were rejected. A rerun of the same step on "
    "the same input gives the same output, byte for byte.",
    "A tokenizer maps text to integers. Byte-level BPE starts from the 256 possible bytes and "
    "repeatedly merges the most frequent adjacent pair into a new symbol, until the vocabulary "
    "reaches its target size. Because it starts from bytes it can encode any string at all, "
    "and decoding the ids gives back exactly the text that went in. Frequent words end up as "
    "single tokens. Rare words are split into several pieces. The chat template adds a few "
    "special tokens that mark who is speaking.",
)
_PII = (
    "Our support desk answers questions about the library every weekday. You can write to "
    "jane.doe@example.org or call +44 20 7946 0958 during office hours. The old mirror at "
    "8.8.4.4 is no longer maintained, so please update your configuration files. Payments for "
    "the premium plan were taken from the card 4539 1488 0343 6467 last month. We never store "
    "passwords in plain text, and every request to the API is logged for thirty days."
)
_GERMAN = (
    "Die Bibliothek liest Textdateien ein, entfernt doppelte Dokumente und schreibt das Ergebnis "
    "in neue Dateien. Jeder Schritt zählt, wie viele Dokumente er erhalten und wie viele er "
    "behalten hat. Fehlerhafte Zeilen werden mit ihrem Grund gesondert gespeichert. So geht "
    "nichts verloren, und man kann später nachvollziehen, warum ein Dokument fehlt. Das "
    "Verfahren ist schnell genug für einen gewöhnlichen Laptop."
)


def _html(text: str) -> str:
    """Return `text` as an HTML page: paragraphs in <p>, a script, a comment, entities."""
    body = "".join(f"<p>{p.replace('&', '&amp;')}</p>\n" for p in text.split("\n\n"))
    return f"<html><head><script>var x = 1;</script></head><body><!-- nav -->\n{body}</body></html>"


def _word_edits(text: str, every: int = 50) -> str:
    """Return `text` with every `every`-th word replaced: a near-duplicate (2% of words edited)."""
    words = text.split(" ")
    return " ".join("changed" if i % every == every - 1 else w for i, w in enumerate(words))


def _mojibake(text: str) -> str:
    """Return `text` as if its UTF-8 bytes had been decoded as Windows-1252."""
    return text.encode("utf-8").decode("cp1252", errors="replace")


def noise_lines(docs: list[dict[str, str]]) -> list[str]:
    """Return the lines of `noise.jsonl`, built around some of the pydoc `docs`."""
    by_id = {d["id"]: d["text"] for d in docs}
    curly = next(d for d in docs if "’" in d["text"] and d["id"].startswith("pydoc-for-"))
    records = [
        # exact duplicates of pydoc documents, up to whitespace or Unicode form
        {"id": "mirror-if-0", "text": "  " + by_id["pydoc-if-0"].replace("\n", "  \r\n") + "\n\n\n"},
        {"id": "mirror-while-0", "text": by_id["pydoc-while-0"].replace(" ", "\u00a0", 5)},
        {"id": "mirror-" + curly["id"].removeprefix("pydoc-"), "text": _mojibake(curly["text"])},
        {"id": "noise-cafe", "text": unicodedata.normalize("NFC", _CAFE)},
        {"id": "noise-cafe-nfd", "text": unicodedata.normalize("NFD", _CAFE)},
        # boilerplate, symbol junk, repeated lines, too short
        {"id": "noise-boilerplate-1", "text": _BOILERPLATE},
        {"id": "noise-boilerplate-2", "text": _BOILERPLATE.replace("newsletter", "weekly digest")},
        {"id": "noise-symbols", "text": _SYMBOL_JUNK},
        {"id": "noise-repeated", "text": _REPEATED},
        {"id": "noise-short-1", "text": "Hello world."},
        {"id": "noise-short-2", "text": "See above."},
        {"id": "noise-empty", "text": "   \n  "},
        # records without an id: the reader assigns "<file stem>-<line no>"
        {"text": _NO_ID[0]},
        {"text": _NO_ID[1]},
        # PII to redact, another language, markup to strip, a near-duplicate for fuzzy dedup
        {"id": "noise-pii", "text": _PII},
        {"id": "noise-german", "text": _GERMAN},
        {"id": "noise-html", "text": _html(by_id["pydoc-pass-0"])},
        {"id": "near-pydoc-class-0", "text": _word_edits(by_id["pydoc-class-0"])},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    # malformed lines: the reader sends them to rejects/ with file, line number and reason
    lines += [
        '{"id": "broken-json", "text": "an unterminated string',
        '["a JSON array", "is not a record"]',
        '{"id": "no-text", "title": "a record without a text field"}',
        '{"id": "number-text", "text": 42}',
        '{"id": "null-text", "text": null}',
    ]
    return lines


def main() -> None:
    """Write `pydoc_topics.jsonl` and `noise.jsonl` into `curation/data/`."""
    docs = pydoc_documents()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with open(PYDOC_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    lines = noise_lines(docs)
    NOISE_FILE.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(docs)} documents to {PYDOC_FILE} and {len(lines)} lines to {NOISE_FILE}")


if __name__ == "__main__":
    main()
