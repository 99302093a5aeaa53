"""What the PPO and GRPO loops share: prompt picking, seeded sharded rollouts, scoring, minibatches, steps, checkpoints.

Data parallel over the default process group (recipes.data_parallel). Every
rank draws the same prompts and minibatch orders (one seeded Python RNG);
each response is sampled by a generator seeded by (seed, iteration, row), so
a rollout is the same whether one rank or several sample it. A rank samples
and scores (log-probs, reference, values, reward) its share of the rows; the
shares are gathered, so whole-batch statistics (PPO's advantage whitening,
GRPO's group statistics, the KL) are the one-process ones. In the updates each
rank takes its share of every minibatch, losses are its share's sum over the
whole minibatch's count, and gradients are summed over the ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from alignment.policy import Reference, Rollout, response_logprobs, sample_sharded
from alignment.rewards import RewardFn
from recipes.loop_checkpoint import LoopCheckpoints, python_rng_state, set_python_rng_state


def sample_seed(seed: int, iteration: int, row: int) -> int:
    """Return the seed of the response sampled for rollout row `row` of `iteration`."""
    return ((seed & 0xFFFFF) << 40 | (iteration & 0xFFFFF) << 20 | row & 0xFFFFF) & (2**63 - 1)


@dataclass(frozen=True)
class RLTask:
    """What an RL loop optimises: the prompts (token ids), the reward of a rollout, the frozen reference, eos/pad."""

    prompts: list[list[int]]
    reward: RewardFn
    reference: Reference
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class ScoredRollout:
    """A whole rollout with its scores: (B, R) log-probs, entropies and reference log-probs; (B,) rewards."""

    rollout: Rollout
    logprobs: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """Return the (B, R) mask of the response tokens."""
        return self.rollout.response_mask


class RLLoop:
    """The iteration bookkeeping of an RL loop: RNG, log, data-parallel world, checkpoints."""

    def __init__(self, checkpoints: LoopCheckpoints | None, seed: int):
        self.checkpoints = checkpoints or LoopCheckpoints(None, 0)  # off: the default process group's world
        self.dp = self.checkpoints.dp
        self.seed = seed
        self.rng = random.Random(seed)
        self.log: list[dict] = []
        self.done = 0  # iterations finished (restored from a checkpoint)
        self.total = 0
        torch.manual_seed(seed)

    def restore(self, modules: dict[str, torch.nn.Module],
                optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any] | None:
        """Load the newest checkpoint into the models and optimizers; return the loop's extra state, or None."""
        resumed = self.checkpoints.restore(modules, optimizers, {})
        if not resumed:
            return None
        set_python_rng_state(self.rng, resumed["state"]["rng"])
        self.log, self.done = resumed["state"]["log"], resumed["step"]
        return resumed["state"]

    def iterations(self, total: int, desc: str) -> tqdm:
        """Return the progress bar over the iterations still to run."""
        self.total = total
        return tqdm(range(self.done, total), desc=desc, initial=self.done, total=total, disable=not self.dp.is_main)

    def pick(self, prompts: list[list[int]], count: int, repeat: int = 1) -> list[list[int]]:
        """Return `count` prompts drawn without replacement, each `repeat` times in a row (GRPO's groups)."""
        picked = self.rng.sample(range(len(prompts)), min(count, len(prompts)))
        batch = [prompts[i] for i in picked for _ in range(repeat)]
        self.dp.check_divides(len(batch), "rollout rows (align.rollout_size, or its groups x align.group_size)")
        return batch

    def sample(self, policy: PreTrainedModel, batch: list[list[int]], iteration: int, max_new_tokens: int,
               eos_id: int, pad_id: int) -> Rollout:
        """Return the whole rollout of `batch`, each rank sampling its share (seeded per row)."""
        seeds = [sample_seed(self.seed, iteration, row) for row in range(len(batch))]
        return sample_sharded(policy, batch, max_new_tokens, eos_id, pad_id, seeds, self.dp)

    def rollout(self, task: RLTask, policy: PreTrainedModel, iteration: int, count: int, max_new_tokens: int,
                repeat: int = 1) -> ScoredRollout:
        """Return the scored rollout of `count` picked prompts (each `repeat` times), sampled from `policy`."""
        batch = self.pick(task.prompts, count, repeat)
        rollout = self.sample(policy, batch, iteration, max_new_tokens, task.eos_id, task.pad_id)
        logprobs, entropy = self.scored(rollout, lambda part: response_logprobs(policy, part))  # (B, R) each
        (ref_logprobs,) = self.scored(rollout, lambda part: (task.reference.logprobs(part),))  # (B, R)
        (scores,) = self.scored(rollout, lambda part: (task.reward(part),))  # (B,)
        return ScoredRollout(rollout, logprobs, entropy, ref_logprobs, scores)

    @torch.no_grad()
    def scored(self, rollout: Rollout,
               score: Callable[[Rollout], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Return `score` of the whole rollout: each rank scores its share of the rows, the shares are gathered."""
        part = rollout.select(self.dp.share(list(range(rollout.input_ids.size(0)))))
        return tuple(self.dp.gather_rows(t) for t in score(part))

    def minibatches(self, rows: int, epochs: int, batch_size: int) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (rows of each minibatch, this rank's share of them): `epochs` seeded passes over `rows` rows."""
        self.dp.check_divides(batch_size, "align.batch_size")
        for _ in range(epochs):
            order = self.rng.sample(range(rows), rows)
            for start in range(0, rows, batch_size):
                minibatch = order[start : start + batch_size]
                yield minibatch, self.dp.share(minibatch)

    def step(self, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step on `loss`: backward, gradients summed over ranks, clipped to norm 1."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dp.reduce_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def finish(self, iteration: int, entry: dict, modules: dict[str, torch.nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any] | None = None) -> None:
        """Log the iteration's figures; save a checkpoint where one is due (with the loop's `extra` state)."""
        self.log.append(entry)
        if self.checkpoints.due(iteration + 1, self.total):
            state = {"rng": python_rng_state(self.rng), "log": self.log, **(extra or {})}
            self.checkpoints.save(iteration + 1, modules, optimizers, {}, state)
