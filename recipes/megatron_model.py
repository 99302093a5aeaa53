"""Build a Llama-shaped megatron-core `GPTModel` from a `ModelRecipe`.

CPU (the embedded default): one process, `gloo` world of size 1, local layer
spec (plain torch modules), CPU initialisation and the shims of
`recipes.cpu_shims`. GPU: Transformer Engine layer spec when it imports, CUDA
RNG tracker seeded by megatron-core; torchrun's environment sets up the world
when present.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from recipes.cpu_shims import apply_cpu_shims
from recipes.models import ModelRecipe


def init_model_parallel(seed: int) -> str:
    """Set up torch.distributed and megatron's parallel state (TP=PP=1) once; return the device.

    Idempotent: a second call in the same process only re-applies the RNG setup.
    """
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:  # launched by torchrun
            torch.distributed.init_process_group(backend)
        else:  # one process: an in-memory store, no port, no file
            store = torch.distributed.HashStore()
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return "cuda"
    apply_cpu_shims()
    return "cpu"


def layer_spec(device: str):
    """Return the transformer layer spec: Transformer Engine on GPU when installed, else local."""
    if device == "cuda":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

            import transformer_engine  # noqa: F401  (the spec imports it lazily)

            return get_gpt_layer_with_transformer_engine_spec()
        except ImportError:
            pass
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def transformer_config(recipe: ModelRecipe, device: str) -> TransformerConfig:
    """Return the megatron TransformerConfig of a Llama-shaped recipe (fp32, no dropout, no biases)."""
    return TransformerConfig(
        num_layers=recipe.num_layers,
        hidden_size=recipe.hidden_size,
        num_attention_heads=recipe.num_attention_heads,
        num_query_groups=recipe.num_query_groups,
        ffn_hidden_size=recipe.ffn_hidden_size,
        kv_channels=recipe.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=recipe.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=recipe.init_method_std,
        params_dtype=torch.float32,
        use_cpu_initialization=device == "cpu",
        # The fusions below are CUDA kernels; their torch fallbacks are what runs on CPU.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_gpt_model(recipe: ModelRecipe, vocab_size: int, seed: int, seq_length: int = 0) -> GPTModel:
    """Return a freshly initialised GPTModel for `recipe` (weights drawn from `seed`).

    `vocab_size` is the tokenizer's; the embedding is padded to the recipe's multiple.
    `seq_length` (0 = the recipe's) sets the longest sequence the model is built for.
    """
    device = init_model_parallel(seed)
    torch.manual_seed(seed)
    model = GPTModel(
        config=transformer_config(recipe, device),
        transformer_layer_spec=layer_spec(device),
        vocab_size=recipe.padded_vocab_size(vocab_size),
        max_sequence_length=seq_length or recipe.seq_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(recipe.rotary_base),
    )
    return model.to(device)
