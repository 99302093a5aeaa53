"""Property-based tests of curation (issue 14 item 1): every record is kept, transformed or rejected
with a reason, and no input makes a step raise.

Readers over generated files (plain, `.gz`, `.zst`, Parquet, text), the cleaning steps, language
id, every heuristic rule group, decontamination, the quality classifier, the PII redactor, exact and
fuzzy dedup and the corpus writers are called directly (no Ray); one slow test runs the real curate
stage on Ray over a file of bad records.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lingua import Language
from nemo_curator.tasks import DocumentBatch

from curation import heuristics, langid, minhash, pii
from curation.cleaning import clean_text, dedup_key
from curation.corpus import read_corpus
from curation.curate import split_unwritable, write_jsonl, write_shards
from curation.curator_stages import (
    DecontaminationStage,
    ExactDedupStage,
    FuzzyDedupStage,
    HeuristicFilterStage,
    LanguageStage,
    QualityClassifierStage,
)
from curation.decontam import contaminated, eval_ngrams
from curation.quality_classifier import score, train
from curation.readers import read_file
from curation.shingles import normalized_words
from curation.shipped_data import NOISE_FILE, PYDOC_FILE
from curation.stages import CurateConfig

# derandomize: CI runs the same examples on every clone (a new falsifying example is found by running
# with derandomize=False locally, then pinned with @example)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# any code point, lone surrogates included (what a JSON \u escape can express)
any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF)
any_text = st.text(any_char, max_size=200)
# what the readers pass on: any text UTF-8 can encode (pandas 3 string columns hold nothing else)
utf8_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=["Cs"])
utf8_text = st.text(utf8_char, max_size=200)
wordy_text = st.lists(
    st.one_of(st.sampled_from(["the", "cat", "sat", "on", "a", "mat.", "\n", "\n\n", "  ", "<p>", "&amp;", "[1]",
                               "a@b.co", "192.0.2.1", "8.8.8.8", "+1 555 123 4567", "4111 1111 1111 1111", "\x00",
                               "\ud800", "\r\n", "\u200b", "lorem ipsum", "{"]),
              st.text(any_char, max_size=8)),
    max_size=60,
).map(" ".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "id", "x"]), inner, max_size=3),
    max_leaves=6,
)
record_line = st.one_of(
    st.builds(lambda t, i: json.dumps({"text": t, "id": i}), any_text, st.one_of(st.none(), any_text, st.integers())),
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False), any_text),  # raw UTF-8 (or surrogate bytes)
    json_values.map(json.dumps),
    st.text(any_char, max_size=40),  # mostly invalid JSON
)
newline = st.sampled_from([b"\n", b"\r\n", b"\r"])
# up to ~100k characters: a text repeated
long_text = st.builds(lambda t, k: t * k, st.one_of(wordy_text, any_text), st.integers(1, 500))


def _bytes(line: str) -> bytes:
    """Return a generated line as UTF-8, a lone surrogate (not encodable) as surrogatepass bytes (invalid UTF-8)."""
    return line.encode("utf-8", "surrogatepass")


@st.composite
def jsonl_files(draw) -> bytes:
    """Bytes of a JSON-lines file: records of every kind, any newline, maybe a BOM, maybe raw binary."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    lines = draw(st.lists(record_line, max_size=12))
    body = b"".join(_bytes(line) + draw(newline) for line in lines)
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body


def check_read(path: Path, max_doc_bytes: int = 10_000_000):
    """Read `path`; assert every record seen is a document or a reject with a reason, and docs are writable."""
    result = read_file(path, max_doc_bytes=max_doc_bytes)
    assert len(result.docs) + len(result.rejects) == result.lines
    for r in result.rejects:
        assert r["reason"] and r["line"] >= 1
        json.dumps(r, ensure_ascii=False).encode("utf-8")  # the rejects file can hold it
    for d in result.docs:
        assert d["text"].strip()
        (d["id"] + d["text"]).encode("utf-8")  # no lone surrogate reaches the pipeline
    return result


# ---------------------------------------------------------------- readers


@SETTINGS
@given(data=jsonl_files())
def test_jsonl_reader_accounts_for_every_line(tmp_path, data):
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    check_read(path)


@SETTINGS
@given(data=jsonl_files(), cut=st.floats(0, 1))
def test_gzip_reader_survives_truncation(tmp_path, data, cut):
    whole = gzip.compress(data)
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(whole[: int(len(whole) * cut)])
    check_read(path)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_binary_files_under_every_suffix_are_read_or_rejected(tmp_path, data):
    for name in ("in.jsonl", "in.jsonl.gz", "in.jsonl.zst", "in.parquet", "in.txt"):
        (tmp_path / name).write_bytes(data)
        check_read(tmp_path / name)


@SETTINGS
@given(texts=st.lists(st.one_of(st.none(), any_text.map(lambda t: t.encode("utf-8", "replace").decode())),
                      max_size=8))
def test_parquet_reader_accounts_for_every_row(tmp_path, texts):
    path = tmp_path / "in.parquet"
    pd.DataFrame({"text": pd.Series(texts, dtype=object)}).to_parquet(path)
    result = check_read(path)
    assert result.lines == len(texts)


def _zst_frames(data: bytes, cuts: list[float], level: int, checksum: bool) -> tuple[list[bytes], list[int]]:
    """Return `data` as zstd frames, one per piece between the `cuts` (fractions of it), and the pieces' ends."""
    ends = sorted({len(data), *(int(len(data) * c) for c in cuts)} - {0})
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum)
    return [cctx.compress(data[a:b]) for a, b in zip([0, *ends], ends)], ends


zst_options = st.fixed_dictionaries({"cuts": st.lists(st.floats(0, 1), max_size=3),
                                     "level": st.sampled_from([-5, 1, 3, 19]), "checksum": st.booleans()})


def _records(result) -> list[tuple]:
    """Return what a read found, in line order: (line, "doc", id, text) or (line, reason)."""
    docs = [(int(d["source"].rsplit(":", 1)[1]), "doc", d["id"], d["text"]) for d in result.docs]
    return sorted(docs + [(r["line"], r["reason"]) for r in result.rejects], key=lambda r: r[0])


@SETTINGS
@given(records=st.lists(st.fixed_dictionaries({"text": utf8_text.filter(str.strip),
                                               "id": st.one_of(st.none(), utf8_text, st.integers())}), max_size=10),
       ascii_only=st.booleans(), options=zst_options)
def test_zstd_records_round_trip(tmp_path, records, ascii_only, options):
    data = b"".join(json.dumps(r, ensure_ascii=ascii_only).encode("utf-8") + b"\n" for r in records)
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(b"".join(_zst_frames(data, **options)[0]))
    result = check_read(path)
    assert not result.rejects and result.lines == len(records)
    assert [(d["id"], d["text"], d["source"]) for d in result.docs] == [
        (f"in.jsonl-{i}" if r["id"] in (None, "") else str(r["id"]), r["text"], f"in.jsonl.zst:{i}")
        for i, r in enumerate(records, 1)]


@SETTINGS
@given(data=jsonl_files(), options=zst_options)
def test_zstd_reader_reads_what_the_plain_reader_reads(tmp_path, data, options):
    (tmp_path / "in.jsonl.json").write_bytes(data)  # the same stem, so the same default ids
    (tmp_path / "in.jsonl.zst").write_bytes(b"".join(_zst_frames(data, **options)[0]))
    assert _records(check_read(tmp_path / "in.jsonl.zst")) == _records(check_read(tmp_path / "in.jsonl.json"))


@SETTINGS
@given(data=jsonl_files(), options=zst_options, cut=st.floats(0, 1))
@example(data=b'{"text": "a"}\n' * 1000, options={"cuts": [], "level": 3, "checksum": False}, cut=0.5)
def test_zstd_reader_keeps_what_precedes_truncation(tmp_path, data, options, cut):
    """A cut inside a frame: the lines before it, then unreadable_file; a cut between frames: a shorter file."""
    frames, ends = _zst_frames(data, **options)
    whole = b"".join(frames)
    size = int(len(whole) * cut)
    (tmp_path / "whole").mkdir(exist_ok=True)
    (tmp_path / "whole" / "in.jsonl.zst").write_bytes(whole)
    (tmp_path / "in.jsonl.zst").write_bytes(whole[:size])
    got = _records(check_read(tmp_path / "in.jsonl.zst"))
    boundaries = dict(zip(np.cumsum([len(f) for f in frames]).tolist(), ends)) | {0: 0}
    if size in boundaries:  # whole frames: what the plain reader reads of their data
        (tmp_path / "in.jsonl.json").write_bytes(data[: boundaries[size]])
        assert got == _records(check_read(tmp_path / "in.jsonl.json"))
    else:
        (line, reason), full = got[-1], _records(check_read(tmp_path / "whole" / "in.jsonl.zst"))
        assert reason == "unreadable_file"
        assert got[:-1] == [r for r in full if r[0] < line]


@SETTINGS
@given(data=jsonl_files(), options=zst_options, where=st.floats(0, 1), xor=st.integers(1, 255))
def test_zstd_reader_survives_corruption(tmp_path, data, options, where, xor):
    damaged = bytearray(b"".join(_zst_frames(data, **options)[0]))
    if damaged:
        damaged[min(int(len(damaged) * where), len(damaged) - 1)] ^= xor
    (tmp_path / "in.jsonl.zst").write_bytes(bytes(damaged))
    check_read(tmp_path / "in.jsonl.zst")


def test_reader_cases_named_by_the_issue(tmp_path):
    lines = [
        '{"text": "lone \\ud800 surrogate"}',  # 1 unencodable_text
        '{"text": "ok", "id": "\\udfff"}',  # 2 unencodable_id
        '{"text": "nul \\u0000 inside"}',  # 3 kept
        '[1, 2]',  # 4 not_an_object
        '{"text": 5}',  # 5 text_not_string
        '{"text": "   "}',  # 6 empty_text
        '{"text": "too long ' + "x" * 200 + '"}',  # 7 too_large
        "{not json",  # 8 invalid_json
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[:4]).encode() + b"\r" + "\n".join(lines[4:]).encode())
    result = check_read(path, max_doc_bytes=100)
    assert [d["text"] for d in result.docs] == ["nul \x00 inside"]
    assert [(r["line"], r["reason"]) for r in result.rejects] == [
        (1, "unencodable_text"), (2, "unencodable_id"), (4, "not_an_object"), (5, "text_not_string"),
        (6, "empty_text"), (7, "too_large"), (8, "invalid_json"),
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert check_read(empty).lines == 0
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    assert check_read(truncated).rejects[-1]["reason"] == "unreadable_file"
    frames = [zstandard.ZstdCompressor().compress(b'{"text": "%d"}\n' % i * 1000) for i in range(2)]
    zst = tmp_path / "t.jsonl.zst"
    zst.write_bytes(b"".join(frames))  # two frames: both read
    assert len(check_read(zst).docs) == 2000
    zst.write_bytes(frames[0] + frames[1][:-5])  # truncated second frame: the first kept
    result = check_read(zst)
    assert len(result.docs) == 1000 and [(r["line"], r["reason"]) for r in result.rejects] == [(1001, "unreadable_file")]
    zst.write_bytes(b'{"text": "not compressed"}\n')
    assert [(r["line"], r["reason"]) for r in check_read(zst).rejects] == [(1, "unreadable_file")]


def test_a_line_of_many_megabytes_is_rejected_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "' + b"x" * 5_000_000 + b'"}\n{"text": "b"}\n')
    result = check_read(path, max_doc_bytes=1_000_000)
    assert [d["text"] for d in result.docs] == ["a", "b"]
    assert [(r["line"], r["reason"]) for r in result.rejects] == [(2, "too_large")]


# ---------------------------------------------------------------- cleaning, rules, PII


@SETTINGS
@given(text=st.one_of(any_text, wordy_text), urls=st.booleans(), fix=st.booleans())
@example(text="\ud800", urls=False, fix=False)  # found by hypothesis: dedup_key raised UnicodeEncodeError
def test_cleaning_never_raises_and_is_idempotent_on_whitespace(text, urls, fix):
    cleaned = clean_text(text, fix=fix, urls=urls)
    assert isinstance(cleaned, str) and cleaned == cleaned.strip()
    assert "\r" not in cleaned
    dedup_key(cleaned)  # hashes any text, lone surrogates too


@SETTINGS
@given(texts=st.lists(st.one_of(any_text, wordy_text), min_size=1, max_size=6))
def test_every_rule_group_keeps_or_rejects_with_a_known_reason(texts):
    cfg = CurateConfig()
    for group in heuristics.GROUPS:
        batch = DocumentBatch(dataset_name="t", data=pd.DataFrame({"id": [str(i) for i in range(len(texts))],
                                                                   "text": [_utf8(t) for t in texts]}))
        out = HeuristicFilterStage(group=group, config=cfg).process(batch)
        step = out._metadata["steps"][group]
        assert step["docs_in"] == len(texts)
        assert step["docs_out"] + sum(step["reasons"].values()) == len(texts)
        assert set(step["reasons"]) <= set(heuristics.rule_names())
        assert len(out.to_pandas()) == step["docs_out"]


@SETTINGS
@given(text=st.one_of(any_text, wordy_text))
def test_pii_redaction_is_stable_and_leaves_no_email_it_found(text):
    once, found = pii.redact(text)
    twice, again = pii.redact(once)
    assert twice == once and not again
    if found.get("email"):
        assert not pii.EMAIL.search(once)


# ---------------------------------------------------------------- language id, decontamination, quality classifier

KNOWN_LANGUAGES = {lang.iso_code_639_1.name.lower() for lang in Language.all()} | {"unknown"}
tricky_texts = ["", " ", " \t\r\n\u3000", "\x00", "\x00\x01\x1f\x7f", "\ud800", "\udfff the cat sat \ud800",
                "...!!!", "12345", "the cat sat on a mat. " * 50_000]


def _batch(texts: list[str]) -> DocumentBatch:
    """Return a batch of `texts` as the readers hand them on (lone surrogates replaced)."""
    return DocumentBatch(dataset_name="t", data=pd.DataFrame({"id": [f"d{i}" for i in range(len(texts))],
                                                              "text": [_utf8(t) for t in texts]}))


def _check_step(out: DocumentBatch, name: str, docs_in: int, reasons: set[str]) -> pd.DataFrame:
    """Assert the stage's step accounts for every document with a known reason; return the kept documents."""
    step = out._metadata["steps"][name]
    assert step["docs_in"] == docs_in
    assert step["docs_out"] + sum(step["reasons"].values()) == docs_in
    assert set(step["reasons"]) <= reasons and all(step["reasons"].values())
    kept = out.to_pandas()
    assert len(kept) == step["docs_out"]
    return kept


@SETTINGS
@given(texts=st.lists(st.one_of(any_text, wordy_text, long_text), max_size=6))
@example(texts=tricky_texts)  # found by hypothesis: a lone surrogate made lingua raise UnicodeEncodeError
def test_language_id_gives_every_text_a_known_code_and_a_score_in_range(texts):
    found = langid.detect(texts)
    assert len(found) == len(texts)
    for text, (lang, conf) in zip(texts, found):
        assert lang in KNOWN_LANGUAGES and isinstance(conf, float) and 0.0 <= conf <= 1.0
        assert lang != "unknown" or conf == 0.0
        if not text.strip():
            assert (lang, conf) == ("unknown", 0.0)
    assert langid.detect(texts) == found  # deterministic
    assert [langid.detect([t])[0] for t in texts] == found  # a text's result does not depend on its batch


@SETTINGS
@given(texts=st.lists(st.one_of(any_text, wordy_text, long_text), max_size=6),
       languages=st.lists(st.sampled_from(["en", "de", "la", "so"]), min_size=1, max_size=3, unique=True),
       min_score=st.floats(0, 1))
@example(texts=tricky_texts, languages=["en"], min_score=0.5)
@example(texts=[], languages=["en"], min_score=0.5)
def test_language_stage_keeps_or_rejects_every_document(texts, languages, min_score):
    out = LanguageStage(languages, min_score).process(_batch(texts))
    reasons = {f"language_{lang}" for lang in KNOWN_LANGUAGES} | {"low_language_score"}
    kept = _check_step(out, "language", len(texts), reasons)
    assert kept["language"].isin(languages).all() and (kept["language_score"] >= min_score).all()
    assert sum(out._metadata["steps"]["language"]["counts"].values()) == len(texts)  # detected_<code> per document


@SETTINGS
@given(evals=st.lists(st.one_of(wordy_text, any_text), max_size=5), junk=jsonl_files(),
       docs=st.lists(st.one_of(wordy_text, any_text, long_text), max_size=5), n=st.sampled_from([1, 2, 3, 5, 13]))
@example(evals=["the cat sat on a mat", "\ud800", "", "  "], junk=b"\x00\xff{", docs=tricky_texts, n=3)
def test_decontamination_flags_every_document_holding_an_eval_ngram(tmp_path, evals, junk, docs, n):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b"".join(_bytes(json.dumps({"text": t})) + b"\n" for t in evals) + junk)
    hashes = eval_ngrams([path], n)
    assert hashes.dtype == np.uint64 and (np.diff(hashes) > 0).all()  # sorted, distinct
    eval_texts = [d["text"] for d in read_file(path).docs]  # what the reader keeps of the eval file
    probes = [f"{docs[i % len(docs)] if docs else ''} {e} {docs[-1 - i % len(docs)] if docs else ''}"
              for i, e in enumerate(eval_texts)]
    texts = docs + probes
    hit = contaminated(texts, hashes, n)
    assert hit.dtype == bool and hit.shape == (len(texts),)
    for text, flagged in zip(texts, hit):
        if len(normalized_words(text)) < n:
            assert not flagged  # no n-gram, no match
    for e, flagged in zip(eval_texts, hit[len(docs):]):
        if len(normalized_words(e)) >= n:
            assert flagged  # holds a whole eval text of n words or more
    assert np.array_equal(contaminated(texts, hashes, n), hit)  # deterministic
    assert [contaminated([t], hashes, n)[0] for t in texts] == hit.tolist()  # independent of the batch
    assert not contaminated(texts, np.zeros(0, np.uint64), n).any()

    out = DecontaminationStage(hashes, n).process(_batch(texts))
    kept = _check_step(out, "decontamination", len(texts), {"contaminated"})
    assert not contaminated(kept["text"].tolist(), hashes, n).any()


@functools.lru_cache(maxsize=1)
def _quality_model():
    """Return the quality classifier trained (default settings) on shipped pydoc text vs shipped noise."""
    good = [d["text"] for d in read_file(PYDOC_FILE).docs[:40]]
    bad = [d["text"] for d in read_file(NOISE_FILE).docs[:40]]
    return train(good, bad)


@SETTINGS
@given(texts=st.lists(st.one_of(any_text, wordy_text, long_text), max_size=6))
@example(texts=tricky_texts)
@example(texts=[])
def test_quality_scores_are_deterministic_probabilities(texts):
    model = _quality_model()
    p = score(model, texts)
    assert p.shape == (len(texts),) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert np.array_equal(score(model, texts), p)  # deterministic
    assert np.array_equal([score(model, [t])[0] for t in texts], p)  # independent of the batch
    wordless = [i for i, t in enumerate(texts) if not normalized_words(t)]
    assert np.allclose(p[wordless], 1 / (1 + np.exp(-model.bias)))  # no feature: the bias alone


@SETTINGS
@given(good=st.lists(st.one_of(any_text, wordy_text), min_size=1, max_size=4),
       bad=st.lists(st.one_of(any_text, wordy_text), min_size=1, max_size=4), ngram=st.integers(1, 3))
@example(good=["\ud800"], bad=[""], ngram=2)  # no text has a word
def test_quality_training_on_any_texts_gives_a_usable_model(good, bad, ngram):
    model = train(good, bad, ngram=ngram, bits=10, epochs=20)
    assert model.weights.shape == (1 << 10,) and np.isfinite(model.weights).all() and np.isfinite(model.bias)
    again = train(good, bad, ngram=ngram, bits=10, epochs=20)
    assert np.array_equal(again.weights, model.weights) and again.bias == model.bias
    p = score(model, good + bad)
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    with pytest.raises(ValueError, match="good and bad"):
        train(good, [])


@SETTINGS
@given(texts=st.lists(st.one_of(any_text, wordy_text, long_text), max_size=6), min_score=st.floats(0, 1))
@example(texts=tricky_texts, min_score=0.5)
@example(texts=[], min_score=0.5)
def test_quality_stage_keeps_or_rejects_every_document(texts, min_score):
    out = QualityClassifierStage(_quality_model(), min_score).process(_batch(texts))
    kept = _check_step(out, "quality_classifier", len(texts), {"low_quality"})
    assert ((kept["quality_score"] >= min_score) & (kept["quality_score"] <= 1)).all()


# ---------------------------------------------------------------- dedup


def _utf8(text: str) -> str:
    """Return `text` without lone surrogates (as the readers hand texts on)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _dedup(texts: list[str]) -> tuple[pd.DataFrame, list, list]:
    texts = [_utf8(t) for t in texts]
    df = pd.DataFrame({"id": [f"d{i}" for i in range(len(texts))], "text": texts})
    df["dedup_key"] = [dedup_key(t) for t in texts]
    df["minhash"] = list(minhash.signatures(texts, 5, 16, 42))
    exact = ExactDedupStage().process(DocumentBatch(dataset_name="t", data=df))
    fuzzy = FuzzyDedupStage(bands=4, rows=4).process(exact)
    return fuzzy.to_pandas(), exact._metadata["duplicates"], fuzzy._metadata["near_duplicates"]


@SETTINGS
@given(texts=st.lists(st.one_of(st.sampled_from(["a b c d e f", "a b c d e f g", "x"]), wordy_text, any_text),
                      max_size=10))
def test_dedup_keeps_plus_removes_equal_input_and_is_deterministic(texts):
    kept, exact, near = _dedup(texts)
    assert len(kept) + len(exact) + len(near) == len(texts)
    assert set(kept["id"]) | {d["id"] for d in exact + near} == {f"d{i}" for i in range(len(texts))}
    again = _dedup(texts)
    assert again[0]["id"].tolist() == kept["id"].tolist() and again[1] == exact and again[2] == near


# ---------------------------------------------------------------- writers


@SETTINGS
@given(texts=st.lists(st.one_of(any_text, wordy_text), min_size=1, max_size=6), fmt=st.sampled_from(["jsonl", "parquet"]))
def test_writers_round_trip_and_reject_what_they_cannot_write(tmp_path, texts, fmt):
    docs = pd.DataFrame({"id": [f"d{i}" for i in range(len(texts))], "text": pd.Series(texts, dtype=object),
                         "source": [f"in.jsonl:{i + 1}" for i in range(len(texts))]})
    writable, rejects = split_unwritable(docs)
    assert len(writable) + len(rejects) == len(texts)
    assert len(rejects) == sum(t != _utf8(t) for t in texts)
    assert all(r["reason"] == "unwritable" and r["detail"] for r in rejects)
    out = tmp_path / fmt
    for old in out.glob("*") if out.exists() else []:
        old.unlink()
    write_shards(out, writable, 4, fmt)
    write_jsonl(tmp_path / "rejects.jsonl", rejects)
    back = read_corpus(out)
    assert [(d["id"], d["text"], d["source"]) for d in back] == list(
        writable[["id", "text", "source"]].itertuples(index=False, name=None))


def test_rejects_with_a_lone_surrogate_file_name_are_still_written(tmp_path):
    path = tmp_path / "rejects.jsonl"
    write_jsonl(path, [{"file": "bad\udcff.jsonl", "line": 1, "reason": "invalid_json"}])
    assert json.loads(path.read_text(encoding="utf-8"))["file"] == "bad\udcff.jsonl"


def test_a_file_name_that_is_not_utf8_gives_writable_ids_and_sources(tmp_path):
    path = tmp_path / os.fsdecode(b"bad\xff.jsonl")
    path.write_bytes(b'{"text": "hello"}\n')
    (doc,) = check_read(path).docs
    assert doc["source"] == "bad?.jsonl:1" and doc["id"] == "bad?-1"


# ---------------------------------------------------------------- the real stage


@pytest.mark.slow
def test_curate_stage_completes_on_bad_records_and_counts_add_up(tmp_path):
    from curation.curate import run
    from pipeline.stage import StageContext

    from curation.shipped_data import PYDOC_FILE

    docs = [json.loads(x) for x in PYDOC_FILE.read_text(encoding="utf-8").splitlines()[:14]]
    good = [d["text"] for d in docs[:12]]
    lines = [json.dumps({"text": t}) for t in good[:6]]
    lines += [
        json.dumps({"text": "lone surrogate \ud800 " + docs[12]["text"]}, ensure_ascii=True),
        json.dumps({"text": "a NUL \u0000 here " + docs[13]["text"], "id": "nul"}),
        "[1, 2, 3]",
        '{"text": 7}',
        "{broken",
    ]
    lines += [json.dumps({"text": t}) for t in good[6:]]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\n")
    out = tmp_path / "curate"
    out.mkdir()
    cfg = CurateConfig(inputs=[str(src)], fix_unicode=False, max_rejects_fraction=0.9, ray_cpus=1)
    ctx = StageContext(name="curate", config=cfg, run_dir=tmp_path, out_dir=out, inputs={}, seed=1)
    result = run(ctx)

    stats = json.loads((out / "stats.json").read_text())
    rejects = [json.loads(x) for x in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["line"], r["reason"]) for r in rejects} >= {
        (7, "unencodable_text"), (9, "not_an_object"), (10, "text_not_string"), (11, "invalid_json")}
    assert all(r["reason"] for r in rejects)
    corpus = read_corpus(out / "corpus")
    assert stats["input_lines"] == len(lines)
    removed = sum(s["docs_in"] - s["docs_out"] for s in stats["steps"][1:])
    assert stats["rejects"] + removed + len(corpus) == len(lines)
    assert result.metrics["docs_out"] == len(corpus) > 0
    assert corpus[0]["source"] == "in.jsonl:1"  # line 1, after the BOM, is read
