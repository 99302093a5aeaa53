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
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from alignment.policy import Rollout, answer_ids, device, last_token_scores, pack, prompt_ids


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


def train_loop(
    model: PreTrainedModel,
    batch_loss: Callable[[list[int]], torch.Tensor],
    num_examples: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    desc: str,
) -> list[float]:
    """Train `model` (its parameters that require grad) for `steps` AdamW steps on `batch_loss(example indices)`.

    Returns each step's loss. Batches follow a seeded permutation of the
    examples, re-drawn each epoch; the learning rate decays linearly to zero;
    gradients are clipped to norm 1.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(steps, 1)))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in (bar := tqdm(range(steps), desc=desc)):
        if len(order) < batch_size:
            order += rng.sample(range(num_examples), num_examples)
        picked, order = order[:batch_size], order[batch_size:]
        loss = batch_loss(picked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def train_reward_model(
    model: PreTrainedModel,
    examples: list[dict],
    pad_id: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> list[float]:
    """Train `model` on encoded pairs with the Bradley-Terry loss (train_loop); return each step's loss."""

    def batch_loss(rows: list[int]) -> torch.Tensor:
        return bradley_terry_loss(*pair_scores(model, [examples[i] for i in rows], pad_id))

    return train_loop(model, batch_loss, len(examples), steps, batch_size, learning_rate, seed, "reward model")


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
