"""A word-level caption tokenizer and a small transformer text encoder trained with the denoiser.

Every token sequence starts with [BOS], so the empty prompt (the "null" prompt of
classifier-free guidance) is [BOS] + padding and never fully masked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
WEIGHTS_FILE = "text_encoder.safetensors"
CONFIG_FILE = "text_encoder.json"


def words(text: str) -> list[str]:
    """Return the lower-case words of a caption (punctuation dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclasses.dataclass
class WordTokenizer:
    """Maps captions to fixed-length id sequences over a closed word vocabulary."""

    vocab: list[str]
    max_length: int

    @classmethod
    def fit(cls, captions: list[str]) -> "WordTokenizer":
        """Return a tokenizer whose vocabulary is every word of `captions` (sorted)."""
        vocab = sorted({w for c in captions for w in words(c)})
        return cls([PAD, BOS, UNK] + vocab, 1 + max(len(words(c)) for c in captions))

    def unknown_words(self, text: str) -> list[str]:
        """Return the words of `text` outside the vocabulary (they encode as [UNK])."""
        known = set(self.vocab)
        return [w for w in words(text) if w not in known]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ids (B, L) int64 and mask (B, L) bool (True = real token), truncated to max_length."""
        index = {w: i for i, w in enumerate(self.vocab)}
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [index[BOS]] + [index.get(w, index[UNK]) for w in words(text)]
            seq = seq[: self.max_length]
            ids[row, : len(seq)] = torch.tensor(seq)
        return ids, ids != 0


class TextEncoder(nn.Module):
    """Token + position embeddings, pre-norm transformer encoder layers, final LayerNorm."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "max_length": max_length, "dim": dim, "layers": layers, "heads": heads}
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return hidden states (B, L, dim) for ids (B, L) and mask (B, L) True = token."""
        x = self.tokens(ids) + self.positions[: ids.shape[1]]  # (B, L, D)
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.norm(x)


def save_text_encoder(model: TextEncoder, tokenizer: WordTokenizer, out_dir: Path) -> None:
    """Write text_encoder.safetensors and text_encoder.json (config + vocabulary) to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    meta = {"model": model.config, "vocab": tokenizer.vocab, "max_length": tokenizer.max_length}
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_text_encoder(directory: Path) -> tuple[TextEncoder, WordTokenizer]:
    """Return the (eval-mode) encoder and tokenizer written by `save_text_encoder`."""
    meta = json.loads((directory / CONFIG_FILE).read_text())
    model = TextEncoder(**meta["model"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval(), WordTokenizer(meta["vocab"], meta["max_length"])
