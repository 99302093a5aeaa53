"""Tests of the pretrain stage: CPU shims, HF export, data, training, resume after a kill, the stage.

Inputs are built here: a byte-level BPE trained on Python's own docs and
Megatron indexed datasets written with megatron-core's builder, laid out as
the tokenize stage lays them out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

VOCAB = 500  # not a multiple of 64: the Megatron embedding is padded to 512, HF keeps 500
SPECIAL = ["<s>", "</s>", "<pad>"]
REPO = Path(__file__).resolve().parent.parent


def doc_texts() -> list[str]:
    """Return pydoc_data.topics split into paragraphs of at least 80 characters."""
    import re

    from pydoc_data.topics import topics

    paras = (p.strip() for t in sorted(topics) for p in re.split(r"\n\s*\n", topics[t]))
    return [p for p in paras if len(p) >= 80]


def write_tokenized(out: Path) -> Path:
    """Write what the tokenize stage writes (tokenizer/, data/{train,valid}.{bin,idx}) under `out`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = doc_texts()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out / "tokenizer")
    (out / "data").mkdir(parents=True)
    eos = tok.eos_token_id
    splits = {"train": texts[: -len(texts) // 20], "valid": texts[-len(texts) // 20 :]}
    for split, docs in splits.items():
        builder = IndexedDatasetBuilder(str(out / "data" / f"{split}.bin"), dtype=np.uint16)
        for text in docs:
            ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
            builder.add_document(np.asarray(ids), [len(ids)])
        builder.finalize(str(out / "data" / f"{split}.idx"))
    return out


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    return write_tokenized(tmp_path_factory.mktemp("tokenize"))
