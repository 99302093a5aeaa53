"""Model recipes: Llama-shaped decoder configs by name, from the smoke-test `micro` to Llama-3-8B.

A recipe fixes the architecture; the vocabulary comes from the tokenizer at
build time (padded to `vocab_multiple` rows in the Megatron model, exported
with exactly the tokenizer's size). Every recipe is the same family: RoPE,
RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied input and
output embeddings.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """The architecture of one Llama-shaped decoder."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA); == num_attention_heads for MHA
    ffn_hidden_size: int
    seq_length: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    vocab_multiple: int = 64  # embedding rows are padded to a multiple of this

    @property
    def head_dim(self) -> int:
        """Return the size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Return `vocab_size` rounded up to a multiple of `vocab_multiple`."""
        return -(-vocab_size // self.vocab_multiple) * self.vocab_multiple

    def num_params(self, vocab_size: int) -> int:
        """Return the parameter count of this model with a (padded) vocabulary of `vocab_size`."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down
        norms = 2 * h
        return self.num_layers * (attention + mlp + norms) + 2 * vocab_size * h + h

    def flops_per_token(self, vocab_size: int, seq_length: int | None = None) -> float:
        """Return training FLOPs per token: 6·N plus 12·L·s·h for attention (PaLM's count).

        N leaves out the input embedding: a lookup, not a matmul.
        """
        s = seq_length or self.seq_length
        matmul_params = self.num_params(vocab_size) - vocab_size * self.hidden_size
        return 6.0 * matmul_params + 12.0 * self.num_layers * s * self.hidden_size


MODELS: dict[str, ModelRecipe] = {
    # Smoke test of the whole chain: 20 steps in a few seconds.
    "micro": ModelRecipe(
        name="micro",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        seq_length=64,
    ),
    # The embedded default: a few minutes on one CPU thread.
    "tiny": ModelRecipe(
        name="tiny",
        num_layers=4,
        hidden_size=192,
        num_attention_heads=6,
        num_query_groups=2,
        ffn_hidden_size=512,
        seq_length=256,
    ),
    # Llama-3-8B shapes, for the cluster recipe (TE layer spec, torchrun); not run on CPU.
    "llama3_8b": ModelRecipe(
        name="llama3_8b",
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        seq_length=8192,
        rotary_base=500000.0,
        norm_epsilon=1e-5,
        vocab_multiple=128,
    ),
}


def get_model_recipe(name: str) -> ModelRecipe:
    """Return the recipe called `name`."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; models: {', '.join(MODELS)}")
    return MODELS[name]
