"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p).

One sampling loop serves two models: an HF causal LM (its `past_key_values`
cache) and a megatron-core GPTModel (a `StaticInferenceContext`, megatron's
static-batch KV cache; on CPU it needs shim 4 of `recipes.cpu_shims`). Each
backend is a `next_logits(ids, cache) -> (logits, cache)` function: the first
call reads the whole prompt, later calls only the newest token when caching,
or the whole sequence again when not (the reference the cache is tested
against). Prompts of one batch have the same length.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from deploy.llm_runtime.sampling import Sampling, warp

NextLogits = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]  # (ids [b, t], cache) -> ([b, V], cache)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Return `logits` [b, V] divided by `temperature`, with tokens outside top-k / the top-p nucleus at -inf.

    top_k 0 and top_p 1.0 keep every token; the most likely token is always kept. One
    convention with the served decoder: `deploy.llm_runtime.sampling.warp` (transformers' order).
    """
    return warp(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))


def pick_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Return the next token of each row [b]: argmax when temperature is 0, else a draw from the filtered softmax."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)  # [b, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    next_logits: NextLogits,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Return `input_ids` [b, t] followed by up to `max_new_tokens` generated tokens [b, t + n].

    Temperature 0 is greedy. A row that has produced `eos_token_id` continues
    with eos; generation stops when every row has. Sampling draws from a
    generator seeded with `seed`, so a call is reproducible.
    """
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    ids, cache = input_ids, None
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits, cache = next_logits(ids, cache)  # [b, V]
        token = pick_tokens(logits, temperature, top_k, top_p, generator)  # [b]
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        if done.all():
            break
    return ids


def hf_next_logits(model: torch.nn.Module, use_cache: bool = True) -> NextLogits:
    """Return the `next_logits` of an HF causal LM (put in eval mode): its KV cache, or a full forward per token."""
    model.eval()

    def next_logits(ids: torch.Tensor, cache):
        if not use_cache:
            return model(input_ids=ids, use_cache=False).logits[:, -1], None
        new = ids if cache is None else ids[:, -1:]  # the prompt, then one token at a time
        out = model(input_ids=new, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    return next_logits


def megatron_next_logits(
    model: torch.nn.Module, vocab_size: int, max_length: int, use_cache: bool = True
) -> NextLogits:
    """Return the `next_logits` of a megatron GPTModel over the tokenizer's `vocab_size` (padding rows dropped).

    The model is put in eval mode (megatron uses the cache only then). The
    cache is a `StaticInferenceContext` for sequences of up to `max_length` tokens.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from recipes.pretrain_data import causal_mask

    model.eval()

    def next_logits(ids: torch.Tensor, cache):
        b, t = ids.shape
        if not use_cache:
            return model(ids, None, causal_mask(t, ids.device))[:, -1, :vocab_size], None
        if cache is None:  # prefill: the whole prompt, causal
            cache = StaticInferenceContext(b, max_length)
            new, mask = ids, causal_mask(t, ids.device)
        else:  # decode: the newest token sees every cached key
            new, mask = ids[:, -1:], None
        positions = torch.arange(cache.sequence_len_offset, t, device=ids.device).expand(b, -1)  # [b, new]
        logits = model(new, positions, mask, inference_context=cache, runtime_gather_output=True)  # [b, 1, V]
        cache.sequence_len_offset = t
        return logits[:, -1, :vocab_size], cache

    return next_logits
