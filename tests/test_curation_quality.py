"""Curation quality on unseen English text (issue: good documents kept, duplicates and junk removed, PII redacted).

The evaluation corpus (`benchmarks/data/curation_eval.jsonl`, `curation.eval_corpus`) is
library docstrings: English prose with doctests, formulas and parameter lists, plus planted
near and exact copies, junk of eight kinds (other languages from Debian's message
catalogues among them) and personal data. The real curate stage runs on it with its
default settings.
"""

from __future__ import annotations

import pytest

from curation import langid
from curation.eval_corpus import OUT as EVAL_FILE
from curation.pii import redact
from curation.prose import is_name_list, prose, prose_words
from curation.quality_eval import NEAR, evaluate, jaccard, read_jsonl

DOCSTRING = """Return the sum of the squares of the values.

The values may be any iterable of numbers; an empty one sums to zero.

Examples
--------
>>> sum_of_squares([1, 2, 3])
14
>>> sum_of_squares(
...     range(4))
14

Use it in a pipeline like this::

    total = sum_of_squares(read_values("data.csv"))
    print(f"{total:.2f}")

The ``values`` argument is consumed once, as $\\sum_i x_i^2$ requires.
"""


def test_prose_leaves_out_doctests_their_output_literal_blocks_rulers_and_inline_code():
    text = prose(DOCSTRING)
    assert "sum_of_squares([1" not in text and "14" not in text and "range(4)" not in text
    assert "read_values" not in text and "print(" not in text and "--------" not in text
    assert "``values``" not in text and "$" not in text
    assert text.startswith("Return the sum of the squares of the values.")
    assert "Use it in a pipeline like this::" in text and "argument is consumed once" in text
    assert "\n\n\n" not in text  # one blank line where code was cut out
    code = ">>> import numpy as np\n>>> np.zeros(3)\narray([0., 0., 0.])"
    assert prose(code) == code  # nothing but code: judged as it is
    assert prose("Plain prose.\n\n    indented parameter description.") == "Plain prose.\n\n    indented parameter description."


def test_prose_leaves_out_lists_of_names():
    see_also = "See Also\n========\n\njacobi, gegenbauer,\nlegendre, assoc_legendre,\nsympy.polys.orthopolys.jacobi_poly\n"
    text = prose("Return the root of a polynomial; that is a number.\n\n" + see_also)
    assert "legendre" not in text and "jacobi" not in text and "orthopolys" not in text
    assert "See Also" in text and text.startswith("Return the root")
    kept = ("Returns", "When False, output will be dense", "p, q : Polynomial class", "a : int")
    assert all(is_name_list(line) is False for line in kept)
    assert all(is_name_list(line) for line in ("jacobi, gegenbauer,", "numpy.dot", "assoc_legendre", "f()"))


def test_language_id_reads_the_prose_of_english_with_code():
    heavy = DOCSTRING + "\n".join(f">>> x{k} = frobnicate_{k}(np.arange({k}), axis=-1)" for k in range(40))
    language, score = langid.detect([prose_words(heavy)])[0]
    assert language == "en" and score >= 0.5


@pytest.mark.parametrize("text", ["ellipk(0.8) is 2.2572053268208538 here", "Float(3) prints 3.00000000000000",
                                  "ISBN 9780898716467, SIAM", "x = 14.20744635310134"])
def test_decimal_fractions_and_isbns_are_not_card_numbers(text):
    assert redact(text) == (text, {})


def test_cards_next_to_punctuation_are_still_redacted():
    assert redact("paid with 4539 1488 0343 6467, then 4539-1488-0343-6467.")[1] == {"credit_card": 2}


def test_evaluation_corpus_labels_are_consistent():
    records = read_jsonl(EVAL_FILE)
    position = {r["id"]: k for k, r in enumerate(records)}
    assert len(position) == len(records) >= 900
    for r in records:
        if r["label"].endswith("_duplicate"):
            assert position[r["of"]] < position[r["id"]]  # the original comes first: it is the one kept
        assert all(s in r["text"] for s in r["pii"])
    near = [jaccard(r["text"], records[position[r["of"]]]["text"]) for r in records if r["label"] == "near_duplicate"]
    assert sum(j >= NEAR for j in near) >= 0.9 * len(near)


@pytest.mark.slow
def test_curate_defaults_on_unseen_english_text(tmp_path):
    """The figures of the README's quality table, from the real stage with its default settings."""
    f = evaluate(tmp_path)
    assert f["junk_removal"] >= 0.97, f["junk_kept"]
    assert f["near_duplicate_recall"] >= 0.97, f["near_duplicates_missed"]
    assert f["exact_duplicate_recall"] == 1.0
    assert f["pii_recall"] >= 0.97
    assert f["pii_false_redactions"] <= 2
    assert f["good_retention"] >= 0.97, f["good_lost"]
    # every document a filter dropped is in rejects/filtered.jsonl with its step and reason
    filtered = read_jsonl(tmp_path / "curate" / "rejects" / "filtered.jsonl")
    records = read_jsonl(EVAL_FILE)
    assert {r["id"] for r in filtered} >= {r["id"] for r in records if r["label"].startswith("junk_")} - set(
        f["junk_kept"])
    assert all(r["step"] and r["reason"] and r["source"].startswith("curation_eval.jsonl:") for r in filtered)
    foreign = {r["id"] for r in records if r["label"] == "junk_language"}
    assert {r["step"] for r in filtered if r["id"] in foreign} == {"language"}
