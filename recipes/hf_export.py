"""Megatron GPTModel <-> Hugging Face Llama: the weight mapping, and the export of a checkpoint.

Megatron keeps attention's q, k, v in one matrix, grouped by key/value head:
for each of the `ng` groups, that group's `hpg` query heads, then its key head,
then its value head (rows of `head_dim` each). HF Llama keeps `q_proj`
(all query heads in order), `k_proj` and `v_proj`. Query head j belongs to
group j // hpg in both. Megatron's SwiGLU `linear_fc1` is [gate; up] stacked
on rows; HF has `gate_proj` and `up_proj`. The Megatron embedding and output
layer are padded to the recipe's vocabulary multiple; HF gets exactly the
tokenizer's rows. With tied embeddings (Llama-3.2-1B) Megatron has no
`output_layer.weight` and HF's `lm_head` is the embedding. Llama-3 RoPE scaling
is megatron's `rope_scaling` and HF's `rope_type: llama3` with the same
constants (low/high frequency factors 1 and 4, original context 8192).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from recipes.models import ModelRecipe
from recipes.sharding import placements

def megatron_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the weights of a one-process model (TP = PP = 1) by canonical local-spec name (TE names renamed)."""
    table = placements(model)
    return {table[name].name: param.detach() for name, param in model.named_parameters()}


def rope_parameters(recipe: ModelRecipe) -> dict:
    """Return HF's `rope_parameters` of `recipe`: default RoPE, or Llama-3 scaling as megatron applies it."""
    if not recipe.rope_scaling_factor:
        return {"rope_type": "default", "rope_theta": recipe.rotary_base}
    return {
        "rope_type": "llama3",
        "rope_theta": recipe.rotary_base,
        "factor": recipe.rope_scaling_factor,
        "low_freq_factor": 1.0,  # megatron's RotaryEmbedding._apply_scaling defaults
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def llama_config(recipe: ModelRecipe, vocab_size: int, seq_length: int, **token_ids: int | None) -> LlamaConfig:
    """Return the HF LlamaConfig of `recipe`; `token_ids` are bos_token_id, eos_token_id, pad_token_id."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.ffn_hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_query_groups,
        head_dim=recipe.head_dim,
        max_position_embeddings=seq_length,
        rms_norm_eps=recipe.norm_epsilon,
        rope_parameters=rope_parameters(recipe),
        initializer_range=recipe.init_method_std,
        tie_word_embeddings=recipe.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        dtype="float32",
        **token_ids,
    )


def megatron_to_hf(tensors: dict[str, torch.Tensor], recipe: ModelRecipe, vocab_size: int) -> dict[str, torch.Tensor]:
    """Return the HF LlamaForCausalLM state dict of Megatron `tensors` (local-spec names).

    With tied embeddings `lm_head.weight` is the embedding itself (HF ties the two).
    """
    ng, hd, h = recipe.num_query_groups, recipe.head_dim, recipe.hidden_size
    hpg = recipe.num_attention_heads // ng
    output = "embedding.word_embeddings.weight" if recipe.tie_embeddings else "output_layer.weight"
    hf = {
        "model.embed_tokens.weight": tensors["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": tensors["decoder.final_layernorm.weight"],
        "lm_head.weight": tensors[output][:vocab_size],
    }
    for i in range(recipe.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = tensors[m + "self_attention.linear_qkv.weight"].view(ng, hpg + 2, hd, h)
        gate, up = tensors[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf.update(
            {
                p + "input_layernorm.weight": tensors[m + "input_layernorm.weight"],
                p + "self_attn.q_proj.weight": qkv[:, :hpg].reshape(ng * hpg * hd, h),
                p + "self_attn.k_proj.weight": qkv[:, hpg].reshape(ng * hd, h),
                p + "self_attn.v_proj.weight": qkv[:, hpg + 1].reshape(ng * hd, h),
                p + "self_attn.o_proj.weight": tensors[m + "self_attention.linear_proj.weight"],
                p + "post_attention_layernorm.weight": tensors[m + "pre_mlp_layernorm.weight"],
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": tensors[m + "mlp.linear_fc2.weight"],
            }
        )
    return {k: v.contiguous() for k, v in hf.items()}


def hf_to_megatron(hf: dict[str, torch.Tensor], recipe: ModelRecipe, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Return Megatron local-spec tensors of an HF Llama state dict (padding rows are zero)."""
    ng, hd, h = recipe.num_query_groups, recipe.head_dim, recipe.hidden_size
    hpg = recipe.num_attention_heads // ng

    def pad_rows(w: torch.Tensor) -> torch.Tensor:  # [V, h] -> [V_padded, h]
        return torch.cat([w, w.new_zeros(padded_vocab_size - w.shape[0], w.shape[1])])

    tensors = {
        "embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not recipe.tie_embeddings:
        tensors["output_layer.weight"] = pad_rows(hf["lm_head.weight"])
    for i in range(recipe.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = hf[p + "self_attn.q_proj.weight"].view(ng, hpg, hd, h)
        k = hf[p + "self_attn.k_proj.weight"].view(ng, 1, hd, h)
        v = hf[p + "self_attn.v_proj.weight"].view(ng, 1, hd, h)
        tensors.update(
            {
                m + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
                m + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, h),
                m + "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
                m + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
                m + "mlp.linear_fc1.weight": torch.cat(
                    [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
                ),
                m + "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"],
            }
        )
    return tensors


def export_llama(
    tensors: dict[str, torch.Tensor], recipe: ModelRecipe, tokenizer_dir: Path, seq_length: int, out_dir: Path
) -> Path:
    """Write the model of canonical Megatron `tensors` (whole, not sharded) as an HF Llama checkpoint; return `out_dir`.

    `out_dir` gets config.json, generation_config.json, model.safetensors and the
    files of `tokenizer_dir` copied verbatim (the tokenizer the model was trained with).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = llama_config(
        recipe,
        len(tokenizer),
        seq_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = megatron_to_hf(tensors, recipe, len(tokenizer))
    hf_model = LlamaForCausalLM(config)
    hf_model.load_state_dict(state, strict=True)
    hf_model.save_pretrained(out_dir)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)
    return out_dir
