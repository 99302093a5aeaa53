"""Tests of the `curate` and `tokenize` stages (package curation/).

Peers check our artifacts: megatron-core's IndexedDataset reads the token data,
transformers' AutoTokenizer loads the tokenizer. The slow tests run the real
curate stage (NeMo Curator on a local Ray) through pipeline.runner.execute_stage.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from curation.bpe import CHAT_TEMPLATE, SPECIAL_TOKENS
from curation.cleaning import clean_whitespace, dedup_key, heuristic_filters, unicode_normalizer
from curation.curate import TooManyRejectsError, cap_docs
from curation.curator_stages import ExactDedupStage
from curation.readers import expand_inputs, read_file
from curation.shipped_data import NOISE_FILE, PYDOC_FILE, shipped_inputs
from curation.tokenize import read_corpus, split_documents
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from pipeline.stage import StageContext

torch.set_num_threads(1)


def jsonl(path: Path) -> list[dict]:
    """Return the records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pydoc_docs(n: int) -> list[dict]:
    """Return the first `n` shipped pydoc documents."""
    return jsonl(PYDOC_FILE)[:n]


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
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = read_file(path)

    assert [d["id"] for d in result.docs] == [good[0]["id"], "mixed-4", "17"]
    assert [d["text"] for d in result.docs] == [g["text"] for g in good]
    assert [d["source"] for d in result.docs] == ["mixed.jsonl:1", "mixed.jsonl:4", "mixed.jsonl:9"]
    assert [(r["line"], r["reason"]) for r in result.rejects] == [
        (2, "invalid_json"),
        (5, "not_an_object"),
        (6, "missing_text"),
        (7, "text_not_string"),
        (8, "invalid_utf8"),
    ]
    assert all(r["file"] == str(path) and r["raw"] for r in result.rejects)
    assert result.lines == 8


def test_text_files_are_one_document_each_and_directories_expand(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n\nWith two paragraphs.\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "x", "text": "hello"}) + "\n")
    (tmp_path / "skip.csv").write_text("not,read\n")

    files = expand_inputs([tmp_path])

    assert files == [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    doc = read_file(files[1]).docs
    assert doc == [{"id": "b", "text": "Second file.\n\nWith two paragraphs.\n", "source": "b.txt:1"}]
    with pytest.raises(FileNotFoundError):
        expand_inputs([tmp_path / "missing.jsonl"])


def test_shipped_corpus_parses_with_exactly_the_planted_malformed_lines():
    pydoc = read_file(PYDOC_FILE)
    noise = read_file(NOISE_FILE)

    assert len(pydoc.docs) > 400 and not pydoc.rejects
    assert all(d["id"].startswith("pydoc-") for d in pydoc.docs)
    assert len({d["id"] for d in pydoc.docs}) == len(pydoc.docs)
    assert sorted(r["reason"] for r in noise.rejects) == sorted(
        ["invalid_json", "not_an_object", "missing_text", "text_not_string", "null_text"]
    )
    assert {"noise-13", "noise-14"} <= {d["id"] for d in noise.docs}  # ids assigned to id-less records


# ---------------------------------------------------------------- cleaning, filters, dedup


def clean(text: str) -> str:
    """Return `text` after the stage's normalization (ftfy + NFC, then whitespace)."""
    return clean_whitespace(unicode_normalizer().modify_document(text))


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


def test_heuristic_filters_drop_the_planted_junk_and_keep_prose():
    filters = heuristic_filters(min_words=20, max_symbol_to_word_ratio=0.1)
    noise = {d["id"]: clean(d["text"]) for d in read_file(NOISE_FILE).docs}

    def dropped_by(text: str) -> str | None:
        return next((f.name for f in filters if not f.keep_document(f.score_document(text))), None)

    assert dropped_by(noise["noise-short-1"]) == "word_count"
    assert dropped_by(noise["noise-empty"]) == "word_count"
    assert dropped_by(noise["noise-symbols"]) == "symbol_to_word"
    assert dropped_by(noise["noise-boilerplate-1"]) == "boilerplate_string_ratio"
    assert dropped_by(noise["noise-repeated"]) == "repeated_lines"
    assert dropped_by(noise["noise-cafe"]) is None
    kept = [d for d in pydoc_docs(100) if dropped_by(clean(d["text"])) is None]
    assert len(kept) >= 95


def test_exact_dedup_stage_keeps_first_copy_in_order():
    import pandas as pd
    from nemo_curator.tasks import DocumentBatch

    texts = ["alpha beta", "gamma", "alpha  beta", "delta", "gamma"]
    df = pd.DataFrame({"id": [f"d{i}" for i in range(5)], "text": texts})

    out = ExactDedupStage().process(DocumentBatch(dataset_name="t", data=df))

    assert out.to_pandas()["id"].tolist() == ["d0", "d1", "d3"]
    assert out._metadata["duplicates"] == [{"id": "d2", "duplicate_of": "d0"}, {"id": "d4", "duplicate_of": "d1"}]


def test_cap_docs_is_a_seeded_sample_in_input_order():
    import pandas as pd

    docs = pd.DataFrame({"id": [str(i) for i in range(50)], "text": ["x"] * 50})

    a, b = cap_docs(docs, 10, seed=1), cap_docs(docs, 10, seed=1)

    assert a["id"].tolist() == b["id"].tolist()
    assert a["id"].tolist() == sorted(a["id"].tolist(), key=int)
    assert len(a) == 10 and a["id"].tolist() != cap_docs(docs, 10, seed=2)["id"].tolist()
    assert len(cap_docs(docs, 0, seed=1)) == 50


# ---------------------------------------------------------------- tokenize


def test_split_is_deterministic_disjoint_and_has_a_valid_document():
    train, valid = split_documents(40, 0.05, seed=3)

    assert (train, valid) == split_documents(40, 0.05, seed=3)
    assert sorted(train + valid) == list(range(40)) and len(valid) == 2
    assert len(split_documents(5, 0.05, seed=3)[1]) == 1
    assert split_documents(40, 0.05, seed=4)[1] != valid
    with pytest.raises(ValueError):
        split_documents(1, 0.05, seed=3)


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

    assert result.outputs == {"tokenizer": "tokenizer", "data": "data", "heldout": "heldout.jsonl"}
    m = result.metrics
    assert m["vocab_size"] == 400
    assert m["train_docs"] + m["valid_docs"] == len(docs) and m["valid_docs"] == 6
    assert 1.0 < m["train_chars_per_token"] < 6.0
    json.dumps(m)
    train_idx, valid_idx = split_documents(len(docs), 0.1, seed=7)
    assert [d["id"] for d in jsonl(out / "heldout.jsonl")] == [docs[i]["id"] for i in valid_idx]
    assert read_corpus(out.parent / "curate" / "corpus") == docs


def test_indexed_dataset_reads_back_exactly_the_tokenizer_ids(tokenized):
    """Peer read: megatron-core's IndexedDataset vs transformers' AutoTokenizer encode."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    out, docs, _ = tokenized
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    train_idx, valid_idx = split_documents(len(docs), 0.1, seed=7)
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


# ---------------------------------------------------------------- the real stage on Ray


def ray_children() -> list:
    """Return Ray processes started by this test process that are still alive."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "ray" in " ".join(p.cmdline()).lower()]


@pytest.mark.slow
def test_curate_stage_on_ray_with_shipped_corpus(tmp_path):
    configs = resolve_configs("smoke", ["curate.max_docs=0"])

    manifest = execute_stage(str(tmp_path), "curate", configs_to_json(configs))

    out = tmp_path / "curate"
    docs = [d for shard in sorted((out / "corpus").glob("shard-*.jsonl")) for d in jsonl(shard)]
    ids = [d["id"] for d in docs]
    stats = json.loads((out / "stats.json").read_text())
    rejects = jsonl(out / "rejects" / "rejects.jsonl")
    duplicates = {d["id"]: d["duplicate_of"] for d in jsonl(out / "rejects" / "duplicates.jsonl")}
    shipped = {d["id"]: d for p in shipped_inputs() for d in read_file(p).docs}

    assert set(manifest["outputs"]) == {"corpus", "rejects", "stats"}
    assert len(ids) == len(set(ids)) == manifest["metrics"]["docs_out"] == stats["docs_out"]
    assert set(ids) <= set(shipped)  # ids preserved (or assigned) from the input
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (15, "invalid_json"), (16, "not_an_object"), (17, "missing_text"), (18, "text_not_string"), (19, "null_text")
    ]
    assert stats["steps"][0]["reasons"] == {r["reason"]: 1 for r in rejects}
    assert manifest["metrics"]["rejects"] == 5
    assert {"mirror-if-0", "mirror-while-0", "mirror-for-0", "noise-cafe-nfd"} <= set(duplicates)
    assert {"noise-cafe", "noise-13", "noise-14"} <= set(ids)
    junk = {"noise-boilerplate-1", "noise-boilerplate-2", "noise-symbols", "noise-repeated", "noise-short-1"}
    assert not junk & set(ids)
    for step in stats["steps"][1:]:  # every step hands on what it kept
        assert step["docs_in"] - step["docs_out"] == sum(step["reasons"].values())
    for prev, step in zip(stats["steps"], stats["steps"][1:]):
        assert prev["docs_out"] == step["docs_in"]
    assert all(d["text"] == clean(shipped[d["id"]]["text"]) for d in docs)
    assert not ray_children()


@pytest.mark.slow
def test_curate_keeps_all_good_records_and_fails_on_too_many_rejects(tmp_path):
    good = pydoc_docs(6)
    data = tmp_path / "in"
    data.mkdir()
    lines = [json.dumps(good[0]), json.dumps({"text": good[1]["text"]}), "{oops", json.dumps(good[2])]
    (data / "part.jsonl").write_text("\n".join(lines) + "\n")
    (data / "note.txt").write_text(good[3]["text"])
    configs = resolve_configs("smoke", [f"curate.inputs={data}", "curate.max_rejects_fraction=0.3"])

    manifest = execute_stage(str(tmp_path / "ok"), "curate", configs_to_json(configs))

    docs = jsonl(tmp_path / "ok" / "curate" / "corpus" / "shard-00000.jsonl")
    assert [d["id"] for d in docs] == ["note", good[0]["id"], "part-2", good[2]["id"]]
    assert [d["source"] for d in docs] == ["note.txt:1", "part.jsonl:1", "part.jsonl:2", "part.jsonl:4"]
    assert manifest["metrics"]["rejects"] == 1
    assert jsonl(tmp_path / "ok" / "curate" / "rejects" / "rejects.jsonl")[0]["line"] == 3

    configs = resolve_configs("smoke", [f"curate.inputs={data}", "curate.max_rejects_fraction=0.1"])
    with pytest.raises(TooManyRejectsError, match=r"1 of 5 input lines \(20.0%\) are malformed"):
        execute_stage(str(tmp_path / "bad"), "curate", configs_to_json(configs))
    assert (tmp_path / "bad" / "curate.tmp" / "rejects" / "rejects.jsonl").is_file()
    assert not (tmp_path / "bad" / "curate").exists()
    assert not ray_children()
