"""Model recipes: Llama-shaped decoders by name, from the smoke-test `micro` to Llama-3-70B.

A recipe is a function returning a `ModelRecipe`: the architecture, the
sequence length it is trained at and, for the GPU scale, the parallelism it
needs (`Parallelism`: tensor, pipeline, context and data parallel sizes). All
are the same family: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no
biases. The vocabulary comes from the tokenizer at build time (padded to
`vocab_multiple` rows in the Megatron model, exported with exactly the
tokenizer's size); `vocab_size` records the vocabulary the real model was
trained with, for its parameter count.

The Llama shapes and parallelism follow Megatron-Bridge's pretrain recipes
(`llama32_1b`, `llama3_8b`, `llama3_70b`: global batch 512, micro-batch 1,
sequence 8192, TE layer spec, bf16, distributed optimizer); the reference GPU
count gives the data-parallel size. `get_model_recipe(name, **overrides)`
replaces fields, which is how the pretrain stage's CLI overrides reach a recipe.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How a recipe is split over GPUs: TP x PP x CP x DP = GPUs (1 everywhere on CPU)."""

    tensor: int = 1  # TP: each weight matrix split over this many GPUs
    pipeline: int = 1  # PP: layers split into this many stages
    virtual_pipeline: int = 1  # interleaved stages per pipeline rank (1 = not interleaved)
    context: int = 1  # CP: each sequence split over this many GPUs (needs Transformer Engine)
    sequence_parallel: bool = False  # norms/dropout split along the sequence within TP
    gpus: int = 1  # the reference job size; DP = gpus / (TP * PP * CP)

    @property
    def data(self) -> int:
        """Return the data-parallel size of the reference job."""
        model_parallel = self.tensor * self.pipeline * self.context
        if self.gpus % model_parallel:
            raise ValueError(f"{self.gpus} GPUs do not divide into TP*PP*CP = {model_parallel}")
        return self.gpus // model_parallel


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """The architecture of one Llama-shaped decoder, and how it is trained at scale."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA); == num_attention_heads for MHA
    ffn_hidden_size: int
    seq_length: int
    rotary_base: float = 10000.0
    rope_scaling_factor: float = 0.0  # Llama-3.x RoPE scaling (factor; 0 = none)
    tie_embeddings: bool = False  # output layer shares the input embedding
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    vocab_multiple: int = 64  # embedding rows are padded to a multiple of this
    vocab_size: int = 0  # the real model's vocabulary (0 = whatever tokenizer is used)
    parallelism: Parallelism = Parallelism()
    global_batch_size: int = 0  # sequences per optimizer step at scale (0 = not a cluster recipe)
    micro_batch_size: int = 1  # sequences per forward pass per data-parallel rank

    @property
    def head_dim(self) -> int:
        """Return the size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, vocab_size: int, tensor_parallel: int = 1) -> int:
        """Return `vocab_size` rounded up to a multiple of both `vocab_multiple` and `tensor_parallel`.

        The same size for every TP size that divides `vocab_multiple`: layouts
        then train the same model (the padding rows enter the softmax).
        """
        multiple = math.lcm(self.vocab_multiple, tensor_parallel)
        return -(-vocab_size // multiple) * multiple

    def num_params(self, vocab_size: int | None = None) -> int:
        """Return the parameter count with a (padded) vocabulary of `vocab_size` (default: the recipe's)."""
        vocab = self.vocab_size if vocab_size is None else vocab_size
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down
        norms = 2 * h
        embeddings = (1 if self.tie_embeddings else 2) * vocab * h
        return self.num_layers * (attention + mlp + norms) + embeddings + h

    def flops_per_token(self, vocab_size: int | None = None, seq_length: int | None = None) -> float:
        """Return training FLOPs per token: 6·N plus 12·L·s·h for attention (PaLM's count).

        N counts the output layer but not the input embedding (a lookup, not a matmul).
        """
        vocab = self.vocab_size if vocab_size is None else vocab_size
        s = seq_length or self.seq_length
        matmul_params = self.num_params(vocab) - (0 if self.tie_embeddings else vocab * self.hidden_size)
        return 6.0 * matmul_params + 12.0 * self.num_layers * s * self.hidden_size


def micro() -> ModelRecipe:
    """Return the smoke-test model: 20 steps of the whole chain in a few seconds."""
    return ModelRecipe(
        name="micro", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, seq_length=64, micro_batch_size=8,
    )


def tiny() -> ModelRecipe:
    """Return the embedded default: ~3M parameters with a 4k vocabulary, minutes on one CPU thread."""
    return ModelRecipe(
        name="tiny", num_layers=4, hidden_size=192, num_attention_heads=6, num_query_groups=2,
        ffn_hidden_size=512, seq_length=256, micro_batch_size=8,
    )


def small() -> ModelRecipe:
    """Return a ~30M-parameter Llama (with a 4k vocabulary): the CPU benchmark, one GPU in minutes."""
    return ModelRecipe(
        name="small", num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=2,
        ffn_hidden_size=1536, seq_length=512, vocab_size=4096, micro_batch_size=8,
    )


def llama3_1b() -> ModelRecipe:
    """Return Llama-3.2-1B's shape (tied embeddings, RoPE scaled x32): TP1 PP1 CP1, DP8 on 8 GPUs."""
    return ModelRecipe(
        name="llama3_1b", num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=8192, seq_length=8192, rotary_base=500000.0, rope_scaling_factor=32.0,
        tie_embeddings=True, vocab_multiple=128, vocab_size=128256,
        parallelism=Parallelism(gpus=8), global_batch_size=512, micro_batch_size=1,
    )


def llama3_8b() -> ModelRecipe:
    """Return Llama-3-8B's shape: TP1 PP1 CP2, DP4 on 8 GPUs."""
    return ModelRecipe(
        name="llama3_8b", num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, seq_length=8192, rotary_base=500000.0, vocab_multiple=128, vocab_size=128256,
        parallelism=Parallelism(context=2, gpus=8), global_batch_size=512, micro_batch_size=1,
    )


def llama3_70b() -> ModelRecipe:
    """Return Llama-3-70B's shape: TP4 (sequence parallel) PP4 (5 virtual stages) CP2, DP2 on 64 GPUs."""
    return ModelRecipe(
        name="llama3_70b", num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28672, seq_length=8192, rotary_base=500000.0, vocab_multiple=128, vocab_size=128256,
        parallelism=Parallelism(
            tensor=4, pipeline=4, virtual_pipeline=5, context=2, sequence_parallel=True, gpus=64
        ),
        global_batch_size=512, micro_batch_size=1,
    )


RECIPES: dict[str, Callable[[], ModelRecipe]] = {
    f.__name__: f for f in (micro, tiny, small, llama3_1b, llama3_8b, llama3_70b)
}


def get_model_recipe(name: str, **overrides) -> ModelRecipe:
    """Return the recipe called `name` with the fields in `overrides` replaced.

    Overrides whose value is 0/None/"" are ignored (the config's "use the
    recipe's" value); `parallelism` may be given as a dict of its fields (zeros
    ignored likewise).
    """
    if name not in RECIPES:
        raise KeyError(f"unknown model {name!r}; models: {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    changes = {k: v for k, v in overrides.items() if v not in (0, None, "")}
    if isinstance(changes.get("parallelism"), dict):
        sizes = {k: v for k, v in changes["parallelism"].items() if v}
        changes["parallelism"] = dataclasses.replace(recipe.parallelism, **sizes)
    recipe = dataclasses.replace(recipe, **changes)
    if recipe.hidden_size % recipe.num_attention_heads or recipe.num_attention_heads % recipe.num_query_groups:
        raise ValueError(
            f"{name}: hidden {recipe.hidden_size}, heads {recipe.num_attention_heads} and groups "
            f"{recipe.num_query_groups} must divide evenly"
        )
    return recipe
