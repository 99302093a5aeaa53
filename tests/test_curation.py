"""Tests of the `curate` and `tokenize` stages (package curation/).

Most tests call the curate stage's parts directly (readers, cleaning, rules,
Curator stages on pandas DocumentBatches, dedup) without Ray. Peers check our
work: Curator's own heuristic filters score the rules they share, exact set
Jaccard checks MinHash, pyarrow/gzip write the inputs, megatron-core's
IndexedDataset reads the token data, transformers' AutoTokenizer loads the
tokenizer. The two slow tests run the real curate stage (NeMo Curator on a
local Ray) through pipeline.runner.execute_stage, one of them killed midway;
another checks that a local Ray refuses a driver without its token.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch

from curation import heuristics, minhash, pii
from curation.bpe import CHAT_TEMPLATE, SPECIAL_TOKENS
from curation.cleaning import clean_text, dedup_key, fix_unicode, strip_markup, unicode_normalizer
from curation.curate import (
    TooManyRejectsError,
    cap_docs,
    check_config,
    check_rejects,
    global_dedup,
    merge_tasks,
    sum_steps,
    write_shards,
)
from curation.curator_stages import (
    ExactDedupStage,
    FuzzyDedupStage,
    HeuristicFilterStage,
    LanguageStage,
    PIIRedactionStage,
    QualityClassifierStage,
    SignatureStage,
    build_pipeline,
    run_locally,
    step_names,
)
from curation.decontam import contaminated, eval_ngrams
from curation.quality_classifier import score, train
from curation.readers import expand_inputs, read_file
from curation.shingles import ngram_hashes
from curation.shipped_data import NOISE_FILE, PYDOC_FILE, shipped_inputs
from curation.stages import CurateConfig
from curation.synthetic import dedup_scores, generate
from curation.corpus import read_corpus
from curation.split import decide_split, is_heldout, read_split, write_split
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from pipeline.stage import StageContext

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def jsonl(path: Path) -> list[dict]:
    """Return the records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pydoc_docs(n: int) -> list[dict]:
    """Return the first `n` shipped pydoc documents."""
    return jsonl(PYDOC_FILE)[:n]


def batch_of(texts: list[str], ids: list[str] | None = None) -> DocumentBatch:
    """Return a DocumentBatch of `texts` with ids d0, d1, ..."""
    ids = ids or [f"d{i}" for i in range(len(texts))]
    return DocumentBatch(dataset_name="t", data=pd.DataFrame({"id": ids, "text": texts}))


def run_in_process(files: list[Path], cfg: CurateConfig, **pipeline_args) -> tuple[pd.DataFrame, list[dict], int, dict]:
    """Run the curate pipeline's stages one after another in this process (no Ray).

    Returns (documents after exact and fuzzy dedup, rejects, input records, step totals).
    """
    pipeline = build_pipeline(files, cfg, **pipeline_args)
    tasks = run_locally(pipeline, files)
    docs, rejects, lines = merge_tasks(tasks)
    totals = sum_steps(tasks, step_names(pipeline))
    deduped = global_dedup(docs, cfg)
    totals |= deduped._metadata["steps"]
    return deduped.to_pandas(), rejects, lines, totals


# ---------------------------------------------------------------- reading


def test_reader_sends_malformed_lines_to_rejects_and_keeps_good_records(tmp_path):
    good = pydoc_docs(3)
    lines = [
        json.dumps(good[0]).encode(),
        b'{"id": "broken", "text": "unterminated',
        b"",  # blank lines are skipped, not rejected
        json.dumps({"text": good[1]["text"]}).encode(),  # no id: assigned from file stem + line
        b'"just a string"',
        b'{"id": "no-text"}',
        b'{"id": "int-text", "text": 7}',
        b'{"id": "bad-utf8", "text": "caf\xe9"}',
        json.dumps({"id": 17, "text": good[2]["text"]}).encode(),  # numeric id kept as a string
        b'{"id": "blank", "text": "  \\n\\t "}',
        json.dumps({"id": "big", "text": "x" * 20_000}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = read_file(path, max_doc_bytes=10_000)

    assert [d["id"] for d in result.docs] == [good[0]["id"], "mixed-4", "17"]
    assert [d["text"] for d in result.docs] == [g["text"] for g in good]
    assert [d["source"] for d in result.docs] == ["mixed.jsonl:1", "mixed.jsonl:4", "mixed.jsonl:9"]
    assert [(r["line"], r["reason"]) for r in result.rejects] == [
        (2, "invalid_json"),
        (5, "not_an_object"),
        (6, "missing_text"),
        (7, "text_not_string"),
        (8, "invalid_utf8"),
        (10, "empty_text"),
        (11, "too_large"),
    ]
    assert all(r["file"] == str(path) and r["raw"] for r in result.rejects)
    assert result.lines == 10


def test_ten_megabyte_records_and_files_are_rejected_as_too_large(tmp_path):
    big = "word " * 2_000_001  # 10,000,005 characters
    path = tmp_path / "big.jsonl"
    records = [{"id": "ok", "text": "small text"}, {"id": "huge", "text": big}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "big.txt").write_text(big)

    jsonl_result = read_file(path)
    txt_result = read_file(tmp_path / "big.txt")

    assert [d["id"] for d in jsonl_result.docs] == ["ok"]
    assert [(r["line"], r["reason"]) for r in jsonl_result.rejects] == [(2, "too_large")]
    assert len(jsonl_result.rejects[0]["raw"]) <= 300
    assert txt_result.docs == [] and txt_result.rejects[0]["reason"] == "too_large"


def test_gzip_and_parquet_inputs_read_like_plain_jsonl_with_custom_fields(tmp_path):
    records = [{"doc_id": f"r{i}", "content": d["text"]} for i, d in enumerate(pydoc_docs(5))]
    records.insert(2, {"doc_id": "no-content", "content": None})
    plain = tmp_path / "recs.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    with gzip.open(tmp_path / "recs.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    pd.DataFrame(records).to_parquet(tmp_path / "recs.parquet")

    names = ("recs.jsonl", "recs.jsonl.gz", "recs.parquet")
    results = [read_file(tmp_path / name, "content", "doc_id") for name in names]

    for result in results:
        expected = [(r["doc_id"], r["content"]) for r in records if r["content"]]
        assert [(d["id"], d["text"]) for d in result.docs] == expected
        assert [(r["line"], r["reason"]) for r in result.rejects] == [(3, "null_text")]
        assert [d["source"].split(":")[1] for d in result.docs] == ["1", "2", "4", "5", "6"]
    assert expand_inputs([tmp_path]) == sorted(tmp_path / n for n in ("recs.jsonl", "recs.jsonl.gz", "recs.parquet"))


def test_zst_inputs_need_zstandard(tmp_path):
    path = tmp_path / "recs.jsonl.zst"
    try:
        import zstandard
    except ImportError:
        path.write_bytes(b"not read")
        with pytest.raises(ImportError, match="pip install zstandard"):
            expand_inputs([path])
        return
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"id": "z", "text": "compressed text"}\n'))
    assert [d["id"] for d in read_file(path).docs] == ["z"]


def test_text_files_are_one_document_each_and_directories_expand(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n\nWith two paragraphs.\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "x", "text": "hello"}) + "\n")
    (tmp_path / "skip.csv").write_text("not,read\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")

    files = expand_inputs([tmp_path])

    assert files == [tmp_path / "a.jsonl", tmp_path / "b.txt", tmp_path / "bad.txt"]
    doc = read_file(files[1]).docs
    assert doc == [{"id": "b", "text": "Second file.\n\nWith two paragraphs.\n", "source": "b.txt:1"}]
    assert read_file(files[2]).rejects[0]["reason"] == "invalid_utf8"
    with pytest.raises(FileNotFoundError):
        expand_inputs([tmp_path / "missing.jsonl"])


def test_shipped_corpus_parses_with_exactly_the_planted_malformed_lines():
    pydoc = read_file(PYDOC_FILE)
    noise = read_file(NOISE_FILE)

    assert len(pydoc.docs) > 400 and not pydoc.rejects
    assert all(d["id"].startswith("pydoc-") for d in pydoc.docs)
    assert len({d["id"] for d in pydoc.docs}) == len(pydoc.docs)
    assert sorted(r["reason"] for r in noise.rejects) == sorted(
        ["empty_text", "invalid_json", "not_an_object", "missing_text", "text_not_string", "null_text"]
    )
    assert {"noise-13", "noise-14"} <= {d["id"] for d in noise.docs}  # ids assigned to id-less records


# ---------------------------------------------------------------- cleaning


def clean(text: str) -> str:
    """Return `text` after the stage's default cleaning."""
    return clean_text(text)


def test_normalization_makes_whitespace_and_unicode_variants_identical():
    text = "The café’s naïve menu.\n\n   for x in y:\n       pass"
    variants = [
        unicodedata.normalize("NFD", text),
        "  " + text.replace("\n", "  \r\n") + "\n\n\n\n",
        text.replace(" ", "\u00a0", 2),
        text.encode("utf-8").decode("cp1252"),  # mojibake, repaired by ftfy
    ]
    assert clean(text) == text
    for variant in variants:
        assert dedup_key(clean(variant)) == dedup_key(text), variant
    assert "       pass" in clean(variants[1])  # indentation survives
    assert dedup_key(clean(text + " Extra.")) != dedup_key(text)


def test_unicode_fast_path_gives_what_ftfy_gives():
    texts = [d["text"] for d in pydoc_docs(200)] + ["plain ascii & more", "tab\there", "bell\x07char", "caf\u00e9"]
    ftfy = unicode_normalizer()
    for text in texts:
        assert fix_unicode(text) == ftfy.modify_document(text)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcXYZ 019.,;:!?'\"()-\t\n") + list("\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u2022")
                                        + list("\u00e2\u20ac\u00c3\u00a9\u0080\u00ad\u00a0e\u0301")),
               max_size=40))
def test_unicode_fast_path_gives_what_ftfy_gives_on_typographic_punctuation(text):
    """Lines of ASCII and curly quotes/dashes skip ftfy: it would not change them (mojibake letters mixed in)."""
    assert fix_unicode(text) == "\n".join(unicode_normalizer().modify_document(line) for line in text.split("\n"))


def test_markup_stripping_keeps_prose_and_code_and_removes_urls_on_request():
    page = (
        "<html><head><style>p {color: red}</style><script>var a = 1 < 2;</script></head><body>"
        "<!-- menu --><h1>Title</h1><p>Fish &amp; chips &lt;3 at <a href='https://x.example/a'>our shop</a>."
        "</p><div>Next</div></body></html>"
    )
    assert strip_markup(page).split() == ["Title", "Fish", "&", "chips", "<3", "at", "our", "shop.", "Next"]
    prose = "x = <class 'int'> if a<b else {1: 2}; see &copy and AT&T."
    assert strip_markup(prose) == prose
    with_urls = "Docs at https://docs.python.org/3/ and www.python.org today."
    assert clean_text(with_urls, urls=True) == "Docs at  and  today."
    assert "https://docs.python.org" in clean_text("Docs at https://docs.python.org/3/ today.")


# ---------------------------------------------------------------- heuristic rules

GOOD = """The library reads every input file and turns each record into a document with an identifier.
Cleaning repairs broken characters, strips markup and normalises the white space between words.
Heuristic rules then look at the length of the text, the share of symbols and the repeated lines.
Documents that fail a rule are counted with the name of that rule, so nothing is lost without a trace.

Deduplication compares the documents with each other and keeps only one copy of every text.
Near duplicates are found with MinHash signatures, which are cheap to compare across a large corpus.
The final corpus is written in shards that the tokenizer reads in the same order as the input.
Every step of the pipeline reports how many documents it received and how many it kept at the end."""
GOOD_LINES = [line for line in GOOD.split("\n") if line]
LONG_LINE = "A long line that repeats " + "with many more words in it " * 10 + "until the end."
NO_STOP_WORDS = " ".join(
    ["Python code runs fast.", "Lists store items in order.", "Dictionaries map keys onto values.",
     "Functions return results quickly.", "Classes describe objects plus methods.", "Modules group related code."] * 3
)
BAD = {  # rule -> a text that fails it
    "word_count": "Far too short to count as a document.",
    "mean_word_length": " ".join(["a", "an", "it", "is", "to", "be"] * 20) + ".",
    "symbol_to_word": GOOD + " #" * 20,
    "bullet_lines": "\n".join("• " + line for line in GOOD_LINES),
    "ellipsis_lines": "\n".join(line[:-1] + "..." for line in GOOD_LINES),
    "alpha_words": " ".join(str(n) for n in range(100)) + " " + GOOD_LINES[0],
    "stop_words": NO_STOP_WORDS,
    "repeated_lines": "\n".join([GOOD_LINES[0]] * 5 + GOOD_LINES[1:4]),
    "repeated_paragraphs": "\n\n".join([GOOD_LINES[0]] * 4 + GOOD_LINES[1:3]),
    "repeated_lines_char": "\n".join([LONG_LINE, LONG_LINE] + GOOD_LINES[:3]),
    "repeated_paragraphs_char": "\n\n".join([LONG_LINE, LONG_LINE] + GOOD_LINES[:3]),
    "top_2gram": GOOD + " data pipeline" * 30,
    "top_3gram": GOOD + " data pipeline stage" * 25,
    "top_4gram": GOOD + " the data pipeline stage" * 20,
    **{f"dup_{n}gram": GOOD + "\n\n" + GOOD for n in range(5, 11)},
    "boilerplate_string_ratio": "\n\n".join(["Read our privacy policy before you continue."] * 3 + [GOOD]),
    "lorem_ipsum": GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "curly_bracket": GOOD + "\nUse a mapping such as {1: 2} in this place.",
    "c4_sentences": "One short sentence is here.\nAnother one follows it now.\nA third one ends the page.",
    "line_punct_ratio": GOOD.replace(".", ""),
    "short_line_ratio": "\n".join(" ".join(GOOD.split()[i : i + 4]) for i in range(0, 120, 4)),
    "char_dup_ratio": GOOD + "\n" + GOOD_LINES[0],
    "list_ratio": "\n".join(GOOD.split()),
}
SCORERS = {
    "gopher_quality": heuristics.gopher_quality_scores,
    "gopher_repetition": heuristics.gopher_repetition_scores,
    "fineweb": heuristics.fineweb_scores,
}


def rule_group(name: str) -> str:
    """Return the group of the rule called `name`."""
    return next(g for g, rules in heuristics.GROUPS.items() if any(r.name == name for r in rules))


def rule_keeps(name: str, texts: list[str], cfg: CurateConfig) -> list[bool]:
    """Return whether the rule `name` alone keeps each text."""
    group = rule_group(name)
    if group == "c4":
        scores = {name: np.array([heuristics.c4_clean(t, cfg, frozenset()).scores[name] for t in texts])}
    else:
        scores = SCORERS[group](texts)
    rule = next(r for r in heuristics.GROUPS[group] if r.name == name)
    low, high = rule.bounds(cfg)
    return [bool(low <= s <= high) for s in scores[name]]


def test_there_are_at_least_twenty_rules_each_with_a_failing_example():
    names = [r.name for rules in heuristics.GROUPS.values() for r in rules]
    assert len(names) >= 28 and len(heuristics.rule_names()) == len(names) + 6
    assert set(BAD) == set(names)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_rule_drops_its_bad_example_and_keeps_good_prose(name):
    cfg = CurateConfig(skip_rules=[])

    assert rule_keeps(name, [BAD[name], GOOD], cfg) == [False, True]


def test_rule_thresholds_come_from_the_config():
    assert rule_keeps("word_count", [BAD["word_count"]], CurateConfig(gopher_min_words=5)) == [True]
    assert rule_keeps("curly_bracket", [BAD["curly_bracket"]], CurateConfig(c4_max_curly_brackets=2)) == [True]
    tight = CurateConfig(gopher_max_top_2gram=0.001)
    assert rule_keeps("top_2gram", [GOOD], tight) == [False]


def test_good_prose_passes_every_group_with_every_rule_on():
    cfg = CurateConfig(skip_rules=[])
    for group in cfg.rule_groups:
        out = HeuristicFilterStage(group=group, config=cfg).process(batch_of([GOOD]))
        assert out.num_items == 1, (group, out._metadata["steps"][group])
    assert heuristics.c4_clean(GOOD, cfg, frozenset()).text == GOOD


def test_c4_line_rules_remove_lines_and_citations():
    cfg = CurateConfig(skip_rules=[])
    page = "\n".join([
        GOOD_LINES[0],
        "x" * 1001 + " is a very long word.",
        "A line without an end mark",
        "Two words.",
        "Please enable JavaScript to view this page.",
        "Read our privacy policy for details.",
        GOOD_LINES[1] + "[1]",
    ])

    result = heuristics.c4_clean(page, cfg, frozenset())

    assert result.text == GOOD_LINES[0] + "\n" + GOOD_LINES[1]
    assert result.removed_lines == {r: 1 for r in heuristics.C4_LINE_RULES} and result.citations == 1
    assert heuristics.c4_clean(page, cfg, frozenset({"c4_javascript"})).removed_lines["c4_javascript"] == 0


def test_rules_shared_with_curator_score_like_curators_filters():
    """Peer check on the shipped corpus: Curator's heuristic filters give the same scores."""
    from nemo_curator.stages.text.filters.heuristic import string as cs
    from nemo_curator.stages.text.filters.heuristic.repetition import repetition as cr

    texts = [clean(d["text"]) for d in pydoc_docs(120)]
    texts += [clean(BAD["repeated_lines"]), clean(BAD["boilerplate_string_ratio"])]
    quality, repetition = heuristics.gopher_quality_scores(texts), heuristics.gopher_repetition_scores(texts)
    c4 = [heuristics.c4_clean(t, CurateConfig(), frozenset()).scores for t in texts]
    peers = {
        "word_count": (quality, cs.WordCountFilter(), lambda s: s),
        "mean_word_length": (quality, cs.MeanWordLengthFilter(), lambda s: s),
        "alpha_words": (quality, cs.WordsWithoutAlphabetsFilter(), lambda s: s),
        "repeated_lines": (repetition, cr.RepeatedLinesFilter(), lambda s: 1 - s),
        "repeated_paragraphs": (repetition, cr.RepeatedParagraphsFilter(), lambda s: 1 - s),
        "boilerplate_string_ratio": ({"boilerplate_string_ratio": [c["boilerplate_string_ratio"] for c in c4]},
                                     cs.BoilerPlateStringFilter(), lambda s: s),
    }
    for name, (ours, peer, to_ours) in peers.items():
        theirs = [to_ours(peer.score_document(t)) for t in texts]
        np.testing.assert_allclose(ours[name], theirs, atol=1e-9, err_msg=name)


def reference_ngram_scores(text: str) -> dict[str, float]:
    """Return Gopher's n-gram scores of one text, computed the plain way."""
    words, out = text.split(), {}
    for n in (2, 3, 4):
        counts = Counter(zip(*[words[i:] for i in range(n)]))
        top = max(counts.values(), default=0)
        longest = max((sum(map(len, g)) + n - 1 for g, c in counts.items() if c == top), default=0)
        out[f"top_{n}gram"] = top * longest / len(text) if top >= 2 else 0.0
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i, gram in enumerate(zip(*[words[i:] for i in range(n)])):
            if gram in seen:
                covered[i : i + n] = [True] * n
            seen.add(gram)
        out[f"dup_{n}gram"] = sum(len(w) for w, c in zip(words, covered) if c) / len(text)
    return out


def test_vectorised_ngram_rules_match_a_plain_python_reference():
    texts = [clean(d["text"]) for d in pydoc_docs(80)] + [BAD[k] for k in ("top_2gram", "top_3gram", "dup_5gram")]
    texts += ["a b a b a b c d e f g h a b c d e f g h", "one", "x y " * 40]

    ours = heuristics.gopher_repetition_scores(texts)

    for i, text in enumerate(texts):
        for name, value in reference_ngram_scores(text).items():
            assert ours[name][i] == pytest.approx(value, abs=1e-12), (name, text[:40])


def test_planted_junk_is_dropped_and_prose_kept_by_the_default_rules(tmp_path):
    cfg = CurateConfig(languages=[], fuzzy_dedup=False)
    files = [NOISE_FILE]

    docs, _, _, steps = run_in_process(files, cfg)

    kept = set(docs["id"])
    assert {"noise-cafe", "noise-13", "noise-14", "noise-pii", "noise-html", "mirror-if-0"} <= kept
    assert not kept & {"noise-boilerplate-1", "noise-boilerplate-2", "noise-symbols", "noise-repeated", "noise-short-1"}
    assert steps["c4"]["reasons"] == {"boilerplate_string_ratio": 2}
    assert steps["gopher_repetition"]["reasons"] == {"repeated_lines": 1, "top_2gram": 1}
    assert steps["gopher_quality"]["reasons"] == {"word_count": 2, "stop_words": 1}  # stop words: the German text
    kept_pydoc = [d for d in pydoc_docs(100) if all(
        rule_keeps(r.name, [clean(d["text"])], cfg)[0]
        for g in cfg.rule_groups if g != "c4" for r in heuristics.GROUPS[g] if r.name not in cfg.skip_rules
    )]
    assert len(kept_pydoc) >= 80


# ---------------------------------------------------------------- language, PII, decontamination, classifier

GERMAN = (
    "Die Bibliothek liest jede Eingabedatei und macht aus jedem Datensatz ein Dokument mit einer Kennung. "
    "Danach werden kaputte Zeichen repariert und doppelte Dokumente entfernt."
)


def test_language_stage_keeps_english_and_drops_other_languages():
    out = LanguageStage(languages=["en"], min_score=0.5).process(batch_of([GOOD, GERMAN], ["en-doc", "de-doc"]))

    assert out.to_pandas()["id"].tolist() == ["en-doc"]
    assert out.to_pandas()["language"].tolist() == ["en"] and out.to_pandas()["language_score"][0] > 0.9
    step = out._metadata["steps"]["language"]
    assert (step["docs_in"], step["docs_out"], step["reasons"]) == (2, 1, {"language_de": 1})
    both = LanguageStage(languages=["en", "de"], min_score=0.5).process(batch_of([GOOD, GERMAN]))
    assert both.num_items == 2


def test_pii_redaction_finds_each_kind_and_leaves_look_alikes():
    text = (
        "Mail jane.doe@example.org or call +44 20 7946 0958 or (555) 123-4567. Server 8.8.4.4 and "
        "2001:4860:4860::8888 answer; card 4539 1488 0343 6467 paid. "
        "Not PII: localhost 127.0.0.1, 192.168.1.10, version 3.11.7, 1234567890123 (Luhn fails), "
        "4539 1488 0343 6468, the year 2024, ratio 10:20:30 and user@localhost."
    )

    redacted, counts = pii.redact(text)

    assert counts == {"email": 1, "phone": 2, "ip_address": 2, "credit_card": 1}
    for secret in ("jane.doe@example.org", "7946 0958", "123-4567", "8.8.4.4", "2001:4860", "4539 1488 0343 6467"):
        assert secret not in redacted
    look_alikes = ("127.0.0.1", "192.168.1.10", "3.11.7", "1234567890123", "4539 1488 0343 6468", "10:20:30")
    for kept in (*look_alikes, "user@localhost"):
        assert kept in redacted
    assert "<EMAIL>" in redacted and "<CREDIT_CARD>" in redacted
    assert pii.redact("a@b.co", ["email"], "[{kind}]") == ("[EMAIL]", {"email": 1})
    assert pii.redact("call 555-123-4567", ["email"])[1] == {}


def test_pii_stage_counts_per_kind():
    stage = PIIRedactionStage(kinds=["email", "ip_address"])
    out = stage.process(batch_of(["x@example.com y@example.com 8.8.8.8", GOOD]))

    step = out._metadata["steps"]["pii"]
    assert step["counts"] == {"redacted_email": 2, "redacted_ip_address": 1, "documents_redacted": 1}
    assert out.to_pandas()["text"][0] == "<EMAIL> <EMAIL> <IP_ADDRESS>"


def test_decontamination_drops_documents_sharing_a_13_gram(tmp_path):
    question = "In what year did the first crewed landing on the Moon take place according to the mission logs?"
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": question}) + "\n")
    hashes = eval_ngrams([tmp_path / "eval.jsonl"], 13)
    words = question.split()
    texts = [
        GOOD + " " + question.upper(),  # contains all of it (case differs)
        GOOD + " " + " ".join(words[2:15]) + " and more.",  # exactly 13 consecutive words
        GOOD + " " + " ".join(words[2:14]) + " and more.",  # only 12
        GOOD,
    ]

    assert contaminated(texts, hashes, 13).tolist() == [True, True, False, False]
    assert len(hashes) == len(words) - 12


def word_salad(text: str, seed: int) -> str:
    """Return the words of `text` shuffled: same vocabulary, no grammar."""
    words = text.split()
    np.random.default_rng(seed).shuffle(words)
    return " ".join(words)


def test_quality_classifier_separates_prose_from_word_salad():
    docs = [clean(d["text"]) for d in pydoc_docs(260)]
    train_docs, test_docs = docs[:200], docs[200:]
    model = train(train_docs, [word_salad(t, i) for i, t in enumerate(train_docs)], ngram=2, bits=16)

    good = score(model, test_docs)
    bad = score(model, [word_salad(t, 1000 + i) for i, t in enumerate(test_docs)])

    accuracy = ((good >= 0.5).sum() + (bad < 0.5).sum()) / (len(good) + len(bad))
    assert accuracy >= 0.9, accuracy
    i = int(np.flatnonzero((good >= 0.5) & (bad < 0.5))[0])
    stage = QualityClassifierStage(model=model, min_score=0.5)
    out = stage.process(batch_of([test_docs[i], word_salad(test_docs[i], 1000 + i)]))
    assert out.to_pandas()["id"].tolist() == ["d0"]
    assert out._metadata["steps"]["quality_classifier"]["reasons"] == {"low_quality": 1}


# ---------------------------------------------------------------- dedup


def test_minhash_similarity_estimates_the_exact_jaccard():
    docs = [clean(d["text"]) for d in pydoc_docs(40)]
    rng = np.random.default_rng(0)
    pairs = []
    for i, text in enumerate(docs):
        words = text.split()
        for k in rng.choice(len(words), size=len(words) * (i % 10 + 1) // 50, replace=False):  # 2-20%
            words[k] = f"edit{k}"
        pairs.append((text, " ".join(words)))
    texts = [t for p in pairs for t in p]
    hashes, doc = ngram_hashes(texts, 5)
    sets = [set(hashes[doc == i]) for i in range(len(texts))]
    exact = np.array([len(a & b) / len(a | b) for a, b in zip(sets[::2], sets[1::2])])

    sigs = minhash.signatures(texts, 5, 256, seed=1)
    estimate = minhash.estimated_jaccard(sigs, np.array([[2 * i, 2 * i + 1] for i in range(len(pairs))]))

    assert np.abs(estimate - exact).mean() < 0.03
    assert exact.min() < 0.5 < 0.8 < exact.max()  # the edits spread the similarities


def test_components_and_lsh_buckets():
    assert minhash.components(6, np.array([[0, 3], [3, 5], [1, 2]])).tolist() == [0, 1, 1, 0, 4, 0]
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [8, 8, 8, 8], [minhash.EMPTY] * 4], dtype=np.uint32)
    assert minhash.candidate_pairs(sigs, bands=2, rows=2).tolist() == [[0, 1], [0, 2]]
    assert minhash.fuzzy_dedup(sigs, 2, 2, threshold=0.0).keep.tolist() == [True, False, False, True, True]


def test_fuzzy_dedup_finds_planted_near_duplicates():
    corpus = generate(800, seed=3, near_dup_fraction=0.2, junk_fraction=0.0)
    cfg = CurateConfig()
    batch = SignatureStage(cfg.minhash_ngram, cfg.minhash_bands * cfg.minhash_rows, cfg.minhash_seed).process(
        batch_of([clean(r["text"]) for r in corpus.records], [r["id"] for r in corpus.records])
    )

    exact = ExactDedupStage().process(batch)
    fuzzy = FuzzyDedupStage(cfg.minhash_bands, cfg.minhash_rows, cfg.minhash_threshold).process(exact)

    ids = {r["id"] for r in corpus.records}
    removed = ids - set(fuzzy.to_pandas()["id"])
    scores = dedup_scores(removed, ids, corpus)
    assert scores["planted"] == 160
    assert scores["recall"] >= 0.95 and scores["precision"] >= 0.98, scores
    counts = fuzzy._metadata["steps"]["fuzzy_dedup"]["counts"]
    assert counts["clusters"] >= 100 and counts["largest_cluster"] >= 2
    near = fuzzy._metadata["near_duplicates"]
    origin = corpus.origin
    assert all(origin[n["id"]] in (n["duplicate_of"], origin.get(n["duplicate_of"])) for n in near)


def test_exact_dedup_stage_keeps_first_copy_in_order():
    texts = ["alpha beta", "gamma", "alpha  beta", "delta", "gamma"]

    out = ExactDedupStage().process(batch_of(texts))

    assert out.to_pandas()["id"].tolist() == ["d0", "d1", "d3"]
    assert out._metadata["duplicates"] == [{"id": "d2", "duplicate_of": "d0"}, {"id": "d4", "duplicate_of": "d1"}]


def test_cap_docs_is_a_seeded_sample_in_input_order():
    docs = pd.DataFrame({"id": [str(i) for i in range(50)], "text": ["x"] * 50})

    a, b = cap_docs(docs, 10, seed=1), cap_docs(docs, 10, seed=1)

    assert a["id"].tolist() == b["id"].tolist()
    assert a["id"].tolist() == sorted(a["id"].tolist(), key=int)
    assert len(a) == 10 and a["id"].tolist() != cap_docs(docs, 10, seed=2)["id"].tolist()
    assert len(cap_docs(docs, 0, seed=1)) == 50


# ---------------------------------------------------------------- the whole pipeline, in process


def test_pipeline_in_process_keeps_good_records_in_order_with_consistent_steps(tmp_path):
    good = pydoc_docs(6)
    data = tmp_path / "in"
    data.mkdir()
    lines = [json.dumps(good[0]), json.dumps({"text": good[1]["text"]}), "{oops", json.dumps(good[2])]
    (data / "part.jsonl").write_text("\n".join(lines) + "\n")
    (data / "note.txt").write_text(good[3]["text"])
    (tmp_path / "eval.txt").write_text(good[2]["text"])
    cfg = CurateConfig(inputs=[str(data)], skip_rules=["curly_bracket", "c4_no_terminal_punct", "c4_few_words"],
                       gopher_min_words=20, fineweb_min_line_punct=0.0, fineweb_max_char_dup=1.0)

    docs, rejects, lines_seen, steps = run_in_process(
        expand_inputs(cfg.inputs), cfg, eval_hashes=eval_ngrams([tmp_path / "eval.txt"], 13)
    )

    assert docs["id"].tolist() == ["note", good[0]["id"], "part-2"]
    assert docs["source"].tolist() == ["note.txt:1", "part.jsonl:1", "part.jsonl:2"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(3, "invalid_json")] and lines_seen == 5
    assert steps["decontamination"]["reasons"] == {"contaminated": 1}
    names = ["read", "clean", "language", *cfg.rule_groups, "decontamination", "pii", "exact_dedup", "fuzzy_dedup"]
    chain = [steps[n] for n in names]
    for prev, step in zip(chain, chain[1:]):
        assert prev["docs_out"] == step["docs_in"]
    for step in chain:
        assert step["docs_in"] - step["docs_out"] == sum(step["reasons"].values())


def test_parquet_and_jsonl_shards_read_back_the_same(tmp_path):
    docs = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x y", "café", "z"], "source": ["f:1", "f:2", "f:3"]})

    for fmt in ("jsonl", "parquet"):
        paths = write_shards(tmp_path / fmt, docs, docs_per_shard=2, output_format=fmt)
        assert [p.name for p in paths] == [f"shard-00000.{fmt}", f"shard-00001.{fmt}"]
    assert read_corpus(tmp_path / "parquet") == read_corpus(tmp_path / "jsonl") == docs.to_dict("records")


def test_too_many_rejects_is_an_error():
    check_rejects(1, 10, 0.1, Path("r.jsonl"))
    with pytest.raises(TooManyRejectsError, match=r"2 of 10 input records \(20.0%\) are malformed"):
        check_rejects(2, 10, 0.1, Path("r.jsonl"))


def test_config_overrides_reach_the_rules_and_unknown_names_fail():
    overrides = ["curate.gopher_min_words=5", "curate.skip_rules=", "curate.languages=en,de"]
    cfg = resolve_configs("tiny", overrides)["curate"]
    assert (cfg.gopher_min_words, cfg.skip_rules, cfg.languages) == (5, [], ["en", "de"])
    check_config(cfg)
    for bad in (dict(skip_rules=["no_such_rule"]), dict(rule_groups=["gopher"]), dict(pii_kinds=["ssn"]),
                dict(languages=["xx"]), dict(output_format="csv"), dict(quality_good=["g.jsonl"])):
        with pytest.raises(ValueError):
            check_config(CurateConfig(**bad))

# ---------------------------------------------------------------- tokenize


def test_split_is_by_id_deterministic_and_drops_training_text_that_overlaps_held_out_text(tmp_path):
    docs = pydoc_docs(60)
    split = decide_split(docs, seed=3, fraction=0.1)
    assert split == decide_split(list(reversed(docs)), seed=3, fraction=0.1)  # by id: order does not matter
    assert split.heldout == {d["id"] for d in docs if is_heldout(d["id"], 3, 0.1)} and split.heldout
    assert decide_split(docs, seed=4, fraction=0.1).heldout != split.heldout
    assert len(decide_split(docs[:5], seed=3, fraction=0.0).heldout) == 1  # at least one held out
    assert len(decide_split(docs[:2], seed=3, fraction=1.0).heldout) == 1  # at least one left to train on
    held = next(d for d in docs if d["id"] in split.heldout)
    copy = {"id": "near-copy", "text": "Some new words first. " + " ".join(held["text"].split()[:30])}
    with_copy = decide_split(docs + [copy], seed=3, fraction=0.1)
    assert with_copy.of("near-copy") is None and "near-copy" in with_copy.dropped_overlap  # a run of held-out text
    write_split(tmp_path / "split.json", with_copy)
    assert read_split(tmp_path / "split.json") == with_copy
    with pytest.raises(ValueError):
        decide_split(docs[:1], seed=3, fraction=0.1)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """Run the tokenize stage function on 60 shipped documents; return (out_dir, corpus docs)."""
    from curation.stages import TokenizeConfig
    from curation.tokenize import run

    run_dir = tmp_path_factory.mktemp("run")
    corpus = run_dir / "curate" / "corpus"
    corpus.mkdir(parents=True)
    docs = pydoc_docs(60) + [{"id": "emoji", "text": "Tabs\tand  spaces, café, 🙂 and 中文 text. " * 3}]
    (corpus / "shard-00000.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:30]))
    (corpus / "shard-00001.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[30:]))
    out = run_dir / "tokenize.tmp"
    out.mkdir()
    ctx = StageContext(
        name="tokenize",
        config=TokenizeConfig(vocab_size=400, valid_fraction=0.1),
        run_dir=run_dir,
        out_dir=out,
        inputs={"curate": {"outputs": {"corpus": {"path": "corpus"}}}},
        seed=7,
    )
    result = run(ctx)
    return out, docs, result


def test_tokenize_writes_its_roles_and_metrics(tokenized):
    out, docs, result = tokenized

    assert result.outputs == {"tokenizer": "tokenizer", "data": "data", "heldout": "heldout.jsonl",
                              "split": "split.json"}
    m = result.metrics
    assert m["vocab_size"] == 400
    split = read_split(out / "split.json")
    assert m["train_docs"] + m["valid_docs"] + m["train_docs_dropped_overlap"] == len(docs)
    assert m["valid_docs"] == len(split.heldout) > 0
    assert 1.0 < m["train_chars_per_token"] < 6.0
    json.dumps(m)
    assert [d["id"] for d in jsonl(out / "heldout.jsonl")] == [d["id"] for d in docs if split.of(d["id"]) == "val"]
    assert read_corpus(out.parent / "curate" / "corpus") == docs


def test_indexed_dataset_reads_back_exactly_the_tokenizer_ids(tokenized):
    """Peer read: megatron-core's IndexedDataset vs transformers' AutoTokenizer encode."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    out, docs, _ = tokenized
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    split = read_split(out / "split.json")
    train_idx = [i for i, d in enumerate(docs) if split.of(d["id"]) == "train"]
    valid_idx = [i for i, d in enumerate(docs) if split.of(d["id"]) == "val"]
    for split, idx in (("train", train_idx), ("valid", valid_idx)):
        ds = IndexedDataset(str(out / "data" / split))
        assert len(ds) == len(idx)
        assert ds.index.dtype == np.uint16
        assert list(ds.document_indices) == list(range(len(idx) + 1))  # one sequence per document
        for seq, i in zip(ds, idx):
            expected = tok.encode(docs[i]["text"], add_special_tokens=False) + [tok.eos_token_id]
            assert seq.tolist() == expected


def test_auto_tokenizer_round_trips_and_applies_the_chat_template(tokenized):
    from transformers import AutoTokenizer

    out, docs, _ = tokenized
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())

    assert config["chat_template"] == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    for text in [docs[-1]["text"], docs[0]["text"], "  leading , spaced  .\n\ttab", "ünïcödé 🙂"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>") and ids[-2] == tok.convert_tokens_to_ids("<|assistant|>")


def test_tokenize_rerun_after_a_kill_completes_in_its_kept_work_dir(tmp_path):
    """A kill leaves `tokenize.tmp/` with the runner's fingerprint marker and half-written outputs: a re-run
    reuses that work dir (same fingerprint) and completes with the bytes of an uninterrupted run."""
    from tiny_lm import write_upstream

    from pipeline.runner import FINGERPRINT_FILE

    configs = resolve_configs("smoke", ["tokenize.vocab_size=300"])
    write_shards(tmp_path / "curate" / "corpus", pd.DataFrame(pydoc_docs(40)), docs_per_shard=20)
    write_upstream(tmp_path, configs, "curate", {"corpus": "corpus"})
    fingerprint = execute_stage(str(tmp_path), "tokenize", configs_to_json(configs))["fingerprint"]
    uninterrupted = stage_files(tmp_path / "tokenize")

    work = tmp_path / "tokenize.tmp"  # what a kill during the valid split leaves
    os.replace(tmp_path / "tokenize", work)
    (work / "manifest.json").unlink()
    (work / "heldout.jsonl").unlink()
    (work / "data" / "valid.idx").unlink()
    (work / "data" / "valid.bin").write_bytes(b"\0" * 3)
    (work / FINGERPRINT_FILE).write_text(fingerprint + "\n")

    manifest = execute_stage(str(tmp_path), "tokenize", configs_to_json(configs))

    assert manifest["status"] == "completed" and manifest["resumed"] is True
    assert not work.exists()
    assert stage_files(tmp_path / "tokenize") == uninterrupted




# ---------------------------------------------------------------- the real stage on Ray


def ray_children() -> list:
    """Return Ray processes started by this test process that are still alive."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "ray" in " ".join(p.cmdline()).lower()]


def stage_files(stage_dir: Path) -> dict[str, bytes]:
    """Return the bytes of the curate stage's outputs (not its manifest), by relative path."""
    return {
        str(p.relative_to(stage_dir)): p.read_bytes()
        for p in sorted(stage_dir.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


SHIPPED_OVERRIDES = ["curate.max_docs=0", "curate.executor=ray"]


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """Run the curate stage on the shipped corpus through the runner, on local Ray; return (run dir, manifest)."""
    run_dir = tmp_path_factory.mktemp("shipped")
    manifest = execute_stage(str(run_dir), "curate", configs_to_json(resolve_configs("smoke", SHIPPED_OVERRIDES)))
    return run_dir, manifest


@pytest.mark.slow
def test_curate_stage_on_ray_with_shipped_corpus(shipped_run):
    run_dir, manifest = shipped_run
    out = run_dir / "curate"
    docs = read_corpus(out / "corpus")
    ids = [d["id"] for d in docs]
    stats = json.loads((out / "stats.json").read_text())
    rejects = jsonl(out / "rejects" / "rejects.jsonl")
    duplicates = {d["id"]: d["duplicate_of"] for d in jsonl(out / "rejects" / "duplicates.jsonl")}
    near = {d["id"]: d["duplicate_of"] for d in jsonl(out / "rejects" / "near_duplicates.jsonl")}
    shipped = {d["id"]: d for p in shipped_inputs() for d in read_file(p).docs}
    metrics = manifest["metrics"]

    assert set(manifest["outputs"]) == {"corpus", "rejects", "stats"}
    assert len(ids) == len(set(ids)) == metrics["docs_out"] == stats["docs_out"] >= 300
    assert set(ids) <= set(shipped)  # ids preserved (or assigned) from the input
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (12, "empty_text"), (19, "invalid_json"), (20, "not_an_object"), (21, "missing_text"),
        (22, "text_not_string"), (23, "null_text"),
    ]
    assert stats["steps"][0]["reasons"] == {r["reason"]: 1 for r in rejects}
    assert metrics["rejects"] == 6
    assert {"mirror-if-0", "mirror-while-0", "mirror-for-0", "noise-cafe-nfd", "noise-html"} <= set(duplicates)
    assert near.get("near-pydoc-class-0") == "pydoc-class-0"
    assert {"noise-cafe", "noise-13", "noise-14", "noise-pii"} <= set(ids)
    junk = {"noise-boilerplate-1", "noise-boilerplate-2", "noise-symbols", "noise-repeated", "noise-short-1"}
    junk |= {"noise-german"}
    assert not junk & set(ids)
    pii_doc = next(d for d in docs if d["id"] == "noise-pii")["text"]
    assert "jane.doe@example.org" not in pii_doc and "<EMAIL>" in pii_doc and "<CREDIT_CARD>" in pii_doc
    for step in stats["steps"][1:]:  # every step hands on what it kept
        assert step["docs_in"] - step["docs_out"] == sum(step["reasons"].values())
    for prev, step in zip(stats["steps"], stats["steps"][1:]):
        assert prev["docs_out"] == step["docs_in"]
    by_id = {d["id"]: d["text"] for d in docs}
    cfg = CurateConfig()
    expected = {i: heuristics.c4_clean(clean(shipped[i]["text"]), cfg, frozenset(cfg.skip_rules)).text for i in ids}
    assert all(by_id[i] == expected[i] for i in ids if i != "noise-pii")
    assert [i for i in ids if by_id[i] != clean(shipped[i]["text"])] == ["noise-pii"]
    skeleton_metrics = ["input_lines", "rejects", "rejects_fraction", "docs_out", "chars_out", "removed_word_count",
                        "removed_symbol_to_word", "removed_boilerplate_string_ratio", "removed_repeated_lines",
                        "removed_exact_dedup", "removed_max_docs"]
    assert set(skeleton_metrics) <= set(metrics)
    assert metrics["pii_redacted_email"] == 1 and metrics["fuzzy_dedup_clusters"] >= 1
    json.dumps(metrics)
    assert not ray_children()


def test_local_processes_executor_writes_what_ray_writes(shipped_run, tmp_path):
    """The default executor on one machine (forked worker processes, no Ray) gives the Ray run's files, byte for byte."""
    configs = resolve_configs("smoke", ["curate.max_docs=0", "curate.executor=processes", "curate.workers=2"])
    manifest = execute_stage(str(tmp_path), "curate", configs_to_json(configs))
    assert manifest["status"] == "completed"
    assert stage_files(tmp_path / "curate") == stage_files(shipped_run[0] / "curate")
    assert manifest["metrics"] == shipped_run[1]["metrics"]
    assert not ray_children()


def test_process_executor_runs_any_curator_pipeline_in_order():
    """Curator's contract: every stage's outputs in the order of its inputs, a fan-out stage's too, across workers."""
    from nemo_curator.pipeline import Pipeline

    from curation.process_executor import ProcessPoolExecutor

    @dataclasses.dataclass
    class Split(ProcessingStage[DocumentBatch, DocumentBatch]):
        name: str = "split"

        def inputs(self):
            return ["data"], ["text"]

        def outputs(self):
            return ["data"], ["text"]

        def process(self, batch):
            df = batch.to_pandas()
            return [DocumentBatch(dataset_name="t", data=df.iloc[[k]].assign(pid=os.getpid())) for k in range(len(df))]

    batches = [DocumentBatch(dataset_name="t", data=pd.DataFrame({"text": [f"{b}-{k}" for k in range(3)]}))
               for b in range(8)]
    out = Pipeline(name="t", stages=[Split()]).run(executor=ProcessPoolExecutor(2), initial_tasks=batches)
    assert [t.to_pandas()["text"].item() for t in out] == [f"{b}-{k}" for b in range(8) for k in range(3)]
    assert len({t.to_pandas()["pid"].item() for t in out} - {os.getpid()}) >= 1  # ran in worker processes
    with pytest.raises(ValueError, match="workers"):
        ProcessPoolExecutor(0)


@pytest.mark.slow
def test_killed_curate_leaves_no_visible_output_and_a_rerun_is_identical(shipped_run, tmp_path):
    """Runs in child processes: one Ray session per process (a second one in pytest's would share its state)."""
    configs_json = configs_to_json(resolve_configs("smoke", SHIPPED_OVERRIDES))
    command = [sys.executable, "-c", "import sys; from pipeline.runner import execute_stage; "
               "execute_stage(sys.argv[1], 'curate', sys.argv[2])", str(tmp_path), configs_json]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "curate.tmp").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(4)  # Ray is starting or the pipeline is running
    assert proc.poll() is None, "the stage finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    assert not (tmp_path / "curate").exists()  # nothing visible to a later stage
    assert (tmp_path / "curate.tmp").is_dir()

    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert json.loads((tmp_path / "curate" / "manifest.json").read_text())["status"] == "completed"
    assert not (tmp_path / "curate.tmp").exists()
    assert stage_files(tmp_path / "curate") == stage_files(shipped_run[0] / "curate")


LOCAL_RAY_AND_A_STRANGER = """
import json, os, subprocess, sys
import ray
from curation.curate import ray_cluster
with ray_cluster("", 1):
    address = ray.get_runtime_context().gcs_address
    ours = ray.get(ray.remote(lambda: "ran").remote())
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    join = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False)"
    other = subprocess.run([sys.executable, "-c", join, address], env=stranger, capture_output=True, text=True)
print(json.dumps({"address": address, "ours": ours, "rc": other.returncode, "err": other.stderr[-4000:]}))
"""


@pytest.mark.slow
def test_local_ray_refuses_a_driver_without_its_token(tmp_path):
    """A local Ray listens beyond 127.0.0.1, so it runs with a token of its process; a stranger is refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # where Ray would write a token file of its own (~/.ray/auth_token)
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY_AND_A_STRANGER], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["ours"] == "ran"
    assert result["rc"] != 0 and "InvalidAuthToken" in result["err"], result
    assert not (tmp_path / ".ray").exists()


@pytest.mark.slow
def test_a_parquet_curate_run_reads_back_the_records_of_the_jsonl_run(shipped_run, tmp_path):
    """curate.output_format=parquet: the one corpus reader (tokenize, sft, align) reads the same records."""
    configs_json = configs_to_json(resolve_configs("smoke", SHIPPED_OVERRIDES + ["curate.output_format=parquet"]))
    command = [sys.executable, "-c", "import sys; from pipeline.runner import execute_stage; "
               "execute_stage(sys.argv[1], 'curate', sys.argv[2])", str(tmp_path), configs_json]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    corpus = tmp_path / "curate" / "corpus"
    assert {p.suffix for p in corpus.iterdir()} == {".parquet"}
    assert read_corpus(corpus) == read_corpus(shipped_run[0] / "curate" / "corpus")
