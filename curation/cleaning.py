"""Text cleaning and the heuristic filters of the `curate` stage, shared by its Curator
pipeline and by the single-process baseline of the benchmark.

Cleaning = Curator's `UnicodeReformatter` (ftfy repairs mojibake and control
characters, then NFC) followed by `clean_whitespace`. Exact dedup hashes
`dedup_key(text)`: the cleaned text with every whitespace run made one space, so
copies that differ only in spacing, line breaks or Unicode form collide.
"""

from __future__ import annotations

import hashlib
import re

from nemo_curator.stages.text.filters.doc_filter import DocumentFilter
from nemo_curator.stages.text.filters.heuristic.repetition.repetition import RepeatedLinesFilter
from nemo_curator.stages.text.filters.heuristic.string import (
    BoilerPlateStringFilter,
    SymbolsToWordsFilter,
    WordCountFilter,
)
from nemo_curator.stages.text.modifiers.doc_modifier import DocumentModifier
from nemo_curator.stages.text.modifiers.unicode.unicode_reformatter import UnicodeReformatter

_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_WHITESPACE_RUN = re.compile(r"\s+")


def clean_whitespace(text: str) -> str:
    """Return `text` with LF line ends, plain spaces, no trailing blanks, at most one empty line in a row.

    Leading indentation inside the text is kept (code blocks depend on it).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", _ODD_SPACES.sub(" ", text))
    text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text))
    return text.strip()


def dedup_key(text: str) -> str:
    """Return the exact-dedup hash of a cleaned text (sha1 of its whitespace-collapsed form)."""
    return hashlib.sha1(_WHITESPACE_RUN.sub(" ", text).strip().encode("utf-8")).hexdigest()


class WhitespaceCleaner(DocumentModifier):
    """Curator modifier applying `clean_whitespace`."""

    def modify_document(self, text: str) -> str:
        """Return the text with whitespace cleaned."""
        return clean_whitespace(text)


def unicode_normalizer() -> UnicodeReformatter:
    """Return Curator's ftfy modifier configured for NFC output (curly quotes kept)."""
    return UnicodeReformatter(normalization="NFC", explain=False)


def heuristic_filters(min_words: int, max_symbol_to_word_ratio: float) -> list[DocumentFilter]:
    """Return Curator's heuristic filters in the order they run.

    The word count goes first: it removes empty documents, on which the
    symbol ratio would divide by zero.
    """
    return [
        WordCountFilter(min_words=min_words),
        SymbolsToWordsFilter(max_symbol_to_word_ratio=max_symbol_to_word_ratio),
        BoilerPlateStringFilter(),
        RepeatedLinesFilter(),
    ]
