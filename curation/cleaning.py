"""Text cleaning of the `curate` stage and the exact-dedup key.

`clean_text` applies, in order and each as configured:

1. Unicode repair: Curator's `UnicodeReformatter` (ftfy repairs mojibake,
   HTML entities, terminal escapes and control characters), then NFC. Pure
   ftfy fixes text line by line; lines of ASCII without control characters
   skip it (ftfy cannot change them, and it costs about 0.3 us per character). (ftfy's own HTML-entity
   decoding is off: step 2 decodes entities, once.)
2. Markup stripping: HTML comments, script/style blocks, tags of HTML
   elements (named ones only, so `<class 'int'>` or `a<b` in prose survive),
   entities; block-level tags become line breaks.
3. URL removal (Curator's `UrlRemover`), off by default.
4. Whitespace: LF line ends, plain spaces, no trailing blanks, at most one
   empty line in a row; leading indentation kept (code depends on it).

Exact dedup hashes `dedup_key(text)`: the cleaned text with every whitespace
run made one space, so copies that differ only in spacing, line breaks or
Unicode form collide.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re

from nemo_curator.stages.text.modifiers.string.url_remover import UrlRemover
from nemo_curator.stages.text.modifiers.unicode.unicode_reformatter import UnicodeReformatter

_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
# a line ftfy may change: one with a character other than printable ASCII, tab, and the typographic
# punctuation of ordinary English text (curly quotes, dashes, ellipsis, bullet), which on its own is
# never mojibake (it takes a Latin-1 letter such as Ã or â) and is NFC already; the property test
# checks this against ftfy
_FTFY_CAN_CHANGE = re.compile("[^\t\n\x20-\x7e\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u2022]")

HTML_ELEMENTS = (
    "a abbr address article aside b blockquote body br button caption center cite code dd div dl dt em "
    "figcaption figure font footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe img input label li "
    "link main meta nav noscript ol option p pre q s section select small span strong sub sup table tbody "
    "td th thead title tr tt u ul"
).split()
BLOCK_ELEMENTS = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figure",
                  "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav",
                  "ol", "p", "pre", "section", "table", "tr", "ul"}
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_SCRIPT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?(" + "|".join(HTML_ELEMENTS) + r")\b(?:\s[^<>]*)?/?>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


@functools.lru_cache(maxsize=1)
def unicode_normalizer() -> UnicodeReformatter:
    """Return Curator's ftfy modifier configured for NFC output (curly quotes kept, entities left alone)."""
    return UnicodeReformatter(unescape_html=False, normalization="NFC", explain=False)


def fix_unicode(text: str) -> str:
    """Return `text` repaired by ftfy and NFC-normalised, line by line as ftfy itself works.

    Lines ftfy cannot change (ASCII without control characters, plus curly quotes, dashes,
    ellipses and bullets) skip it.
    """
    if not _FTFY_CAN_CHANGE.search(text):
        return text
    fixer = unicode_normalizer()
    lines = text.split("\n")
    return "\n".join(fixer.modify_document(line) if _FTFY_CAN_CHANGE.search(line) else line for line in lines)


def _tag_replacement(match: re.Match) -> str:
    """Return a line break for a block-level tag, nothing for an inline one."""
    return "\n" if match.group(1).lower() in BLOCK_ELEMENTS else ""


def strip_markup(text: str) -> str:
    """Return `text` without HTML comments, script/style blocks, element tags and entities."""
    if "<" in text:
        text = _COMMENT.sub("", text)
        text = _SCRIPT.sub("", text)
        text = _TAG.sub(_tag_replacement, text)
    if "&" in text:
        text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    return text


def remove_urls(text: str) -> str:
    """Return `text` without URLs (Curator's UrlRemover)."""
    return UrlRemover().modify_document(text)


def clean_whitespace(text: str) -> str:
    """Return `text` with LF line ends, plain spaces, no trailing blanks, at most one empty line in a row.

    Leading indentation inside the text is kept (code blocks depend on it).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", _ODD_SPACES.sub(" ", text))
    text = _BLANK_RUNS.sub("\n\n", _TRAILING.sub("", text))
    return text.strip()


def clean_text(text: str, fix: bool = True, markup: bool = True, urls: bool = False) -> str:
    """Return `text` cleaned: Unicode repair (`fix`), markup stripping (`markup`), URL removal (`urls`), whitespace."""
    if fix:
        text = fix_unicode(text)
    if markup:
        text = strip_markup(text)
    if urls:
        text = remove_urls(text)
    return clean_whitespace(text)


def dedup_key(text: str) -> str:
    """Return the exact-dedup hash of a cleaned text (sha1 of its whitespace-collapsed form).

    Lone surrogates (which the readers reject, but a caller may pass) hash as their code units.
    """
    return hashlib.sha1(" ".join(text.split()).encode("utf-8", "surrogatepass")).hexdigest()
