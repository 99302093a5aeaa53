"""Shared test setup: offline HF, one torch thread, test dir importable; the tiny tokenizer and documents."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny test tokenizer (tests/tiny_lm.py), built once per test module."""
    from tiny_lm import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def docs():
    """The paragraphs of the shipped documents (tests/tiny_lm.py)."""
    from tiny_lm import doc_paragraphs

    return doc_paragraphs()
