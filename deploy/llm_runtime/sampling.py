"""Choosing the next token: greedy, or sampled the way transformers' generate() samples.

Sampling applies temperature, then top-k, then top-p to the logits (transformers'
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order), then draws
with torch.multinomial from the row's own torch.Generator: a request seeded with s draws
what generate(do_sample=True) draws after torch.manual_seed(s), whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import secrets

import torch


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request (top_k 0 and top_p 1 switch those filters off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def sampling_for(temperature: float | None, top_k: int | None, top_p: float | None) -> Sampling | None:
    """Return the Sampling a request asks for, or None for greedy decoding; raise ValueError.

    Greedy unless temperature > 0, or, without a temperature, top_k > 1 or top_p < 1.
    """
    if temperature is not None and not float(temperature) >= 0:
        raise ValueError(f"temperature must be >= 0, got {float(temperature)}")
    if top_k is not None and int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {int(top_k)}")
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {float(top_p)}")
    if temperature is not None:
        sample = float(temperature) > 0
    else:
        sample = (top_k is not None and int(top_k) > 1) or (top_p is not None and float(top_p) < 1)
    if not sample:
        return None
    return Sampling(
        temperature=1.0 if temperature is None else float(temperature),
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
    )


def generator_for(seed: int | None) -> torch.Generator:
    """Return a CPU generator seeded with `seed` (a random seed where None)."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))


def warp(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Return the logits (B, V) after temperature, top-k and top-p (filtered entries are -inf).

    The one sampling filter of the repository: recipes.generate uses it too.
    """
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - sampling.top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def choose_tokens(logits: torch.Tensor, samplings: list, generators: list) -> list[int]:
    """Return the next token of each row of `logits` (B, V): argmax where its Sampling is None,
    else a draw from its generator."""
    tokens = logits.argmax(dim=-1).tolist()  # (B,)
    for row, (sampling, generator) in enumerate(zip(samplings, generators)):
        if sampling is not None:
            probs = warp(logits[row : row + 1].float(), sampling).softmax(dim=-1)  # (1, V)
            tokens[row] = int(torch.multinomial(probs, num_samples=1, generator=generator))
    return tokens
