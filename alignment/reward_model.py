"""Reward model: the SFT checkpoint with a linear scoring head, trained on preference pairs (Bradley-Terry).

The model is transformers' LlamaForSequenceClassification (num_labels=1)
initialised from the SFT checkpoint (its trunk; a fresh `score` head), so it
saves and loads as an ordinary HF checkpoint. A (prompt, answer) pair is
scored at the answer's last token (its eos), exactly how a rollout is
scored in PPO and GRPO. Loss: -log sigmoid(r(chosen) - r(rejected)).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from alignment.policy import Rollout, answer_ids, device, last_token_scores, pack, prompt_ids
from recipes import hf_lm
from recipes.loop_checkpoint import LoopCheckpoints, python_rng_state, set_python_rng_state


def load_scoring_model(path: Path, num_labels: int = 1) -> PreTrainedModel:
    """Return an fp32 sequence-scoring model (on policy.device()) from the HF checkpoint at `path`.

    The head is fresh unless the checkpoint has one of `num_labels` outputs.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels, dtype=torch.float32, local_files_only=True
    )
    return model.to(device()).eval()


def encode_answer(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], answer: str, max_length: int) -> tuple:
    """Return (prompt ids, answer ids + eos) with the answer cut so that both fit `max_length` tokens."""
    ids = prompt_ids(tokenizer, prompt)
    return ids, answer_ids(tokenizer, answer)[: max(max_length - len(ids), 1)]


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[dict], max_length: int) -> list[dict]:
    """Return {"prompt", "chosen", "rejected"} token ids of each preference pair."""
    encoded = []
    for p in pairs:
        prompt, chosen = encode_answer(tokenizer, p["prompt"], p["chosen"][0]["content"], max_length)
        _, rejected = encode_answer(tokenizer, p["prompt"], p["rejected"][0]["content"], max_length)
        encoded.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return encoded


def pair_rollout(examples: list[dict], pad_id: int) -> Rollout:
    """Return the Rollout of a batch of encoded pairs: the B chosen rows, then the B rejected rows."""
    prompts = [e["prompt"] for e in examples] * 2
    return pack(prompts, [e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)


def pair_scores(model: PreTrainedModel, examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scores of the chosen answers, of the rejected answers), each (B,)."""
    scores = last_token_scores(model, pair_rollout(examples, pad_id))[:, 0]  # (2B,)
    return scores[: len(examples)], scores[len(examples) :]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Return the mean pairwise loss -log sigmoid(r_chosen - r_rejected) over (B,) scores."""
    return -F.logsigmoid(chosen - rejected).mean()


@dataclass(frozen=True)
class LoopSettings:
    """How a train_loop trains: AdamW steps, global batch, peak learning rate and its warmup, seed, checkpoints."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    checkpoints: LoopCheckpoints | None = None
    warmup_steps: int = 0


def train_loop(
    model: PreTrainedModel,
    batch_loss: Callable[[list[int]], tuple[torch.Tensor, float]],
    num_examples: int,
    settings: LoopSettings,
    desc: str,
) -> list[float]:
    """Train `model` (its parameters that require grad) for `settings.steps` AdamW steps; return each step's loss.

    `batch_loss(example indices)` returns (the summed loss of those examples,
    how many terms the step's mean is over: examples, tokens, outputs). Batches
    of `batch_size` follow a seeded permutation of the examples, re-drawn each
    epoch; the learning rate warms up linearly over `warmup_steps`, then decays
    linearly to zero; gradients are clipped to
    norm 1. Data parallel over the default process group (recipes.data_parallel:
    each rank its share of every batch, gradients summed); with `checkpoints`
    it saves periodically and resumes from the newest (a finished loop restores
    as finished and trains nothing).
    """
    steps, batch_size = settings.steps, settings.batch_size
    checkpoints = settings.checkpoints or LoopCheckpoints(None, 0)  # off: the default process group's world
    dp = checkpoints.dp
    dp.check_divides(batch_size, desc.replace(" ", "_") + " batch_size")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = hf_lm.adamw_with_schedule(params, settings.learning_rate, settings.warmup_steps, steps)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    resumed = checkpoints.restore({"model": model}, {"adamw": optimizer}, {"lr": schedule})
    if resumed:
        set_python_rng_state(rng, resumed["state"]["rng"])
        order, losses = resumed["state"]["order"], resumed["state"]["losses"]
    model.train()
    for step in (bar := tqdm(range(len(losses) + 1, steps + 1), desc=desc, initial=len(losses), total=steps,
                             disable=not dp.is_main)):
        if len(order) < batch_size:
            order += rng.sample(range(num_examples), num_examples)
        picked, order = order[:batch_size], order[batch_size:]
        summed, terms = batch_loss(dp.share(picked))
        total = max(dp.sum(terms), 1.0)  # a batch of fully truncated answers scores nothing
        optimizer.zero_grad(set_to_none=True)
        (summed / total).backward()
        dp.reduce_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(dp.sum(summed.item()) / total)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoints.due(step, steps):
            state = {"rng": python_rng_state(rng), "order": order, "losses": losses}
            checkpoints.save(step, {"model": model}, {"adamw": optimizer}, {"lr": schedule}, state)
    model.eval()
    return losses


def train_reward_model(
    model: PreTrainedModel, examples: list[dict], pad_id: int, settings: LoopSettings
) -> list[float]:
    """Train `model` on encoded pairs with the Bradley-Terry loss (train_loop); return each step's loss."""

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, float]:
        return bradley_terry_loss(*pair_scores(model, [examples[i] for i in rows], pad_id)) * len(rows), len(rows)

    return train_loop(model, batch_loss, len(examples), settings, "reward model")


@torch.no_grad()
def pairwise_accuracy(model: PreTrainedModel, examples: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Return {"accuracy": share of pairs with r(chosen) > r(rejected), "margin": mean r(chosen) - r(rejected)}."""
    model.eval()
    margins = []
    for s in range(0, len(examples), batch_size):
        chosen, rejected = pair_scores(model, examples[s : s + batch_size], pad_id)
        margins.append(chosen - rejected)
    margin = torch.cat(margins)
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}
