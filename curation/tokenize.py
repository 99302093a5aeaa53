"""The `tokenize` stage: curated corpus -> BPE tokenizer + Megatron train/valid datasets.

Decides the one train / held-out split of the chain (curation.split: by a
seeded hash of each document id, `valid_fraction` held out, at least one; a
training document sharing a 13-gram with a held-out one is dropped) and writes
it as split.json, which SFT and alignment honour too. The tokenizer is trained
on the train documents only, so perplexity on the held-out documents is honest.
Writes, under the stage directory:

    tokenizer/                 tokenizer.json + tokenizer_config.json (AutoTokenizer loads it)
    data/train.{bin,idx}       one sequence per document: its token ids, then </s>
    data/valid.{bin,idx}
    heldout.jsonl              the valid documents as {"id", "text"}
    split.json                 the split (curation.split): held-out ids, training ids dropped for overlap
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer
from tqdm import tqdm

from curation.bpe import EOS, save_for_transformers, train_bpe
from curation.corpus import read_corpus
from curation.megatron_data import write_indexed_dataset
from curation.split import SPLIT_FILE, decide_split, write_split
from curation.stages import TokenizeConfig
from pipeline.stage import StageContext, StageResult

ENCODE_CHUNK = 256  # documents per encode_batch call
OUTPUTS = {"tokenizer": "tokenizer", "data": "data", "heldout": "heldout.jsonl",  # role -> path in the stage dir
           "split": SPLIT_FILE}


def encode_documents(tok: Tokenizer, texts: list[str], desc: str) -> Iterator[list[int]]:
    """Yield each text's token ids followed by the `</s>` id."""
    eos = tok.token_to_id(EOS)
    with tqdm(total=len(texts), desc=desc, unit="doc") as bar:
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start : start + ENCODE_CHUNK]
            for enc in tok.encode_batch(chunk, add_special_tokens=False):
                yield enc.ids + [eos]
            bar.update(len(chunk))


def clear_outputs(out: Path) -> None:
    """Remove what an earlier, killed run of the stage left of its outputs in the work dir `out`.

    The stage takes seconds, so a re-run after a kill starts its outputs afresh
    (same seed, same result) rather than trusting a half-written file.
    """
    for rel in OUTPUTS.values():
        path = out / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run(ctx: StageContext) -> StageResult:
    """Train the tokenizer and write the token datasets under ctx.out_dir; return their roles and metrics."""
    cfg: TokenizeConfig = ctx.config
    out = Path(ctx.out_dir)
    clear_outputs(out)
    docs = read_corpus(ctx.input_path("curate", "corpus"))
    split = decide_split(docs, ctx.seed, cfg.valid_fraction)
    write_split(out / SPLIT_FILE, split)
    splits = {"train": [d for d in docs if split.of(d["id"]) == "train"],
              "valid": [d for d in docs if split.of(d["id"]) == "val"]}

    tok = train_bpe((d["text"] for d in splits["train"]), cfg.vocab_size)
    save_for_transformers(tok, out / "tokenizer")

    (out / "data").mkdir()
    metrics: dict = {"vocab_size": tok.get_vocab_size(), "train_docs_dropped_overlap": len(split.dropped_overlap)}
    for name, split in splits.items():
        texts = [d["text"] for d in split]
        n_docs, n_tokens = write_indexed_dataset(
            out / "data" / name, encode_documents(tok, texts, f"tokenize {name}"), tok.get_vocab_size()
        )
        chars = sum(len(t) for t in texts)
        metrics |= {
            f"{name}_docs": n_docs,
            f"{name}_tokens": n_tokens,
            f"{name}_chars_per_token": round(chars / max(n_tokens - n_docs, 1), 3),  # eos not counted
        }
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n" for d in splits["valid"])

    print_metrics(metrics)
    return StageResult(outputs=dict(OUTPUTS), metrics=metrics)


def print_metrics(metrics: dict) -> None:
    """Print the tokenize summary table."""
    table = Table(title=f"tokenize: byte-level BPE, vocab {metrics['vocab_size']}")
    for col in ("split", "documents", "tokens (incl. </s>)", "chars/token"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name in ("train", "valid"):
        table.add_row(
            name,
            str(metrics[f"{name}_docs"]),
            f"{metrics[f'{name}_tokens']:,}",
            str(metrics[f"{name}_chars_per_token"]),
        )
    Console().print(table)
