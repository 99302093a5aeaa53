"""The prose of a document that mixes prose and code: its lines minus code, doctests and ruler lines.

Language id and the word- and line-based quality rules were made for web
prose; on technical English they judge the code instead. Measured on the
evaluation corpus of library docstrings (`curation.eval_corpus`), the Gopher
rule "at least 80% of words contain a letter" dropped 186 of 600 good
documents for their `>>> a[3, 3] = 50` examples and array printouts, and
lingua called code-heavy documents Latin. With `curate.code_aware` (on by
default) those rules and language id see only what this module keeps:

- not code fences (``` or ~~~) and what is between them;
- not doctest lines (`>>>`, `...`) and their output, up to the next blank line;
- not reStructuredText literal blocks: the lines indented deeper than a line
  ending in `::`;
- not lines without a letter or digit (`=====`, `-----` underlines), nor reStructuredText
  directives and citations (`.. math::`, `.. [1] https://...`);
- not inline code and math: ``code``, `name`, :role:`target`, $x^2$;
- not lists of names (a "See Also" section): lines that are only comma-separated single
  tokens, two or more, or one code name (`snake_case`, `a.b.c`, `f()`);
- everything else, in order (numpydoc parameter lists are prose: indentation
  alone does not make code).

A text with no prose line keeps all its lines: pure code is judged as before.
"""

from __future__ import annotations

import re

FENCES = ("```", "~~~")
INLINE = re.compile(r"(?::\w+:)?``[^`]+``|(?::\w+:)?`[^`]+`|\$[^$\n]+\$")  # ``code``, :role:`x`, `x`, $math$
DOCTEST = (">>>", "...")
NAME = re.compile(r"[\w.]+(?:\(\))?")  # one token of a name list
CODE_NAME = re.compile(r"\w*_\w*|\w+(?:\.\w+)+|\w+\(\)")  # snake_case, a.b.c, f()


def is_name_list(stripped: str) -> bool:
    """Return whether a stripped line is only names: two or more comma-separated single tokens, or one code name."""
    items = [item.strip() for item in stripped.rstrip(",").split(",")]
    if not all(NAME.fullmatch(item) for item in items):
        return False
    return len(items) >= 2 or bool(CODE_NAME.fullmatch(items[0]))


def prose(text: str) -> str:
    """Return the prose lines of `text` joined by newlines (`text` itself when none is left)."""
    if not any(mark in text for mark in (">>>", "::", "```", "~~~", "==", "--", ".. ", "`", "$")):
        return text
    kept: list[str] = []
    in_fence = in_doctest = False
    literal_indent = -1  # indentation of the `::` line while inside its literal block
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith(FENCES):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if stripped.startswith(DOCTEST):
            in_doctest = True
            continue
        if in_doctest:
            in_doctest = bool(stripped)
            continue
        indent = len(line) - len(line.lstrip())
        if literal_indent >= 0:
            if not stripped or indent > literal_indent:
                continue
            literal_indent = -1
        if stripped.endswith("::"):
            literal_indent = indent
        if stripped.startswith(".. ") or (stripped and not any(c.isalnum() for c in stripped)):
            continue  # reStructuredText directives and citations; ruler lines
        if stripped and is_name_list(stripped):
            continue
        if "`" in line or "$" in line:
            line = INLINE.sub("", line)
        if stripped or (kept and kept[-1].strip()):  # one blank line where code was cut out, not a run
            kept.append(line)
    result = "\n".join(kept).strip("\n")
    return result if result.strip() else text


def prose_words(text: str) -> str:
    """Return the words of `text`'s prose that are letters only (punctuation around them stripped), space-joined.

    What language identification reads: identifiers (`snake_case`, `a.b`), numbers,
    markup and URLs say nothing about the language of the prose around them.
    """
    words = (w.strip(".,;:!?()[]{}\"'`*") for w in prose(text).split())
    return " ".join(w for w in words if w.isalpha())
