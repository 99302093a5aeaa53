"""Builders of tiny real inputs for the sft/align/evaluate tests (not fixtures: plain functions).

The tokenize stage's own byte-level BPE (curation.bpe) trained on Python's
documentation, a randomly initialised 2-layer Llama, a JSONL corpus of documentation paragraphs, and the
layout of upstream stage outputs that `StageContext.input_path` reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def doc_paragraphs(min_chars: int = 80) -> list[dict]:
    """Return pydoc_data.topics split into paragraph documents {"id", "text"}."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        for i, para in enumerate(re.split(r"\n\s*\n", topics[topic])):
            text = para.strip()
            if len(text) >= min_chars:
                docs.append({"id": f"{topic}-{i}", "text": text})
    return docs


def write_corpus(directory: Path, docs: list[dict], shards: int = 2) -> Path:
    """Write `docs` as JSONL shards `shard-*.jsonl` in `directory`, as the curate stage does; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with open(directory / f"shard-{s:05d}.jsonl", "w") as f:
            for doc in docs[s::shards]:
                f.write(json.dumps(doc) + "\n")
    return directory


def write_corpus_upstream(run_dir: Path, configs: dict, docs: list[dict]) -> None:
    """Mark curate (`docs` as its corpus) and tokenize (their split, curation.split) completed in `run_dir`."""
    from curation.split import decide_split, write_split

    write_corpus(run_dir / "curate" / "corpus", docs)
    write_upstream(run_dir, configs, "curate", {"corpus": "corpus"})
    (run_dir / "tokenize").mkdir(parents=True, exist_ok=True)
    write_split(run_dir / "tokenize" / "split.json",
                decide_split(docs, configs["run"].seed, configs["tokenize"].valid_fraction))
    write_upstream(run_dir, configs, "tokenize", {"split": "split.json"})


def build_tokenizer(tmp_dir: Path, vocab_size: int = 512):
    """Return the HF tokenizer the tokenize stage would save, trained here on pydoc text."""
    from transformers import AutoTokenizer

    from curation.bpe import save_for_transformers, train_bpe

    save_for_transformers(train_bpe((d["text"] for d in doc_paragraphs()), vocab_size), tmp_dir)
    return AutoTokenizer.from_pretrained(str(tmp_dir), local_files_only=True)


def build_model(tokenizer, hidden: int = 48, layers: int = 2, seed: int = 0, positions: int = 512):
    """Return a randomly initialised fp32 LlamaForCausalLM sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_hf(directory: Path, model, tokenizer) -> Path:
    """Save `model` and `tokenizer` as an HF checkpoint in `directory`; return it."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_upstream(run_dir: Path, configs: dict, name: str, outputs: dict[str, str]) -> None:
    """Mark stage `name` completed in `run_dir` with `outputs` (role -> path under run_dir/name).

    The manifest carries the fingerprint the runner plans for `configs`, so
    `pipeline.runner.execute_stage` accepts it as the real upstream stage.
    """
    from pipeline import manifest as mf
    from pipeline.runner import make_plan

    stage_dir = run_dir / name
    fingerprint = next(p.fingerprint for p in make_plan(run_dir, configs, [name]) if p.name == name)
    record = {
        "stage": name,
        "status": "completed",
        "fingerprint": fingerprint,
        "outputs": {role: mf.describe_output(stage_dir / rel, stage_dir) for role, rel in outputs.items()},
        "metrics": {},
    }
    mf.write_json_atomic(stage_dir / mf.MANIFEST, record)
