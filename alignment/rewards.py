"""Rewards of a rollout for PPO and GRPO: the reward model's score, or a Python function of the texts.

A Python reward is named "package.module:function"; the function takes
(prompts, completions), both lists of strings (the decoded prompt and
response of each row), and returns one float per row, as TRL's GRPO reward
functions do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.policy import Rollout, last_token_scores

RewardFn = Callable[[Rollout], torch.Tensor]  # rollout -> (B,) rewards


def import_function(spec: str) -> Callable:
    """Return the function named "package.module:function" (ValueError on a malformed name)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward function {spec!r} must be named 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def model_reward(reward_model: PreTrainedModel) -> RewardFn:
    """Return the reward of a rollout by the reward model: its score at each response's last token."""

    @torch.no_grad()
    def reward(rollout: Rollout) -> torch.Tensor:
        reward_model.eval()
        return last_token_scores(reward_model, rollout)[:, 0]  # (B,)

    return reward


def function_reward(function: Callable, tokenizer: PreTrainedTokenizerBase) -> RewardFn:
    """Return the reward of a rollout by `function(prompts, completions) -> list[float]` on the decoded texts."""

    def reward(rollout: Rollout) -> torch.Tensor:
        width = rollout.prompt_width
        prompts = [
            tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
            for row, mask in zip(rollout.input_ids[:, :width], rollout.attention_mask[:, :width])
        ]
        completions = [tokenizer.decode(r, skip_special_tokens=True) for r in rollout.responses()]
        values = function(prompts, completions)
        if len(values) != len(completions):
            raise ValueError(f"reward function returned {len(values)} values for {len(completions)} completions")
        return torch.tensor([float(v) for v in values], device=rollout.input_ids.device)

    return reward
