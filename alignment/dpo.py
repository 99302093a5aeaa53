"""DPO and its relatives (sigmoid = DPO, ipo, hinge = SLiC) on preference pairs, in our data-parallel loop.

The loss of a pair is computed from log-ratio sums r = log pi(answer) - log
pi_ref(answer) over the answer tokens, as TRL's DPOTrainer computes it (the
tests check ours against TRL's on the same pairs): sigmoid -log sigmoid(beta
(r_c - r_r)), hinge relu(1 - beta (r_c - r_r)), ipo (r_c/|c| - r_r/|r| -
1/(2 beta))^2. The reference is the frozen SFT model: a second copy when the
whole policy is trained, or, with a LoRA policy, the same model with its
adapters disabled, so no second copy is held. Held-out pairs are scored before
and after training with TRL's figures (implicit rewards beta * r: all zero
before, by construction).

Why our loop and not TRL's trainer: it is `alignment.reward_model.train_loop`,
the loop every other method trains in, so DPO gets the same data-parallel
semantics (one global batch whatever the world size) and the same atomic,
pickle-free checkpoints with exact resume; HF Trainer under torchrun spreads a
global batch differently (its per-step losses at 2 ranks left the one-rank ones
after the first update) and has a checkpoint format of its own.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.policy import Reference, response_logprobs
from alignment.reward_model import LoopSettings, encode_pairs, pair_rollout, train_loop
from alignment.stages import AlignConfig
from recipes import hf_lm
from recipes.data_parallel import DataParallel
from recipes.loop_checkpoint import LoopCheckpoints

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# TRL's names of the DPO figures, kept in the stage metrics (val_ prefix on held-out scores).
REWARD_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def check_loss_type(loss_type: str) -> None:
    """Raise ValueError for a DPO loss this module does not implement."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"align.loss_type={loss_type!r}: choose from {', '.join(LOSS_TYPES)}")


def log_ratios(policy: PreTrainedModel, reference: Reference, examples: list[dict],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (r_chosen, r_rejected, answer lengths (B, 2)): log pi - log pi_ref summed over each answer's tokens.

    Gradients flow through the policy's log-probs only.
    """
    rollout = pair_rollout(examples, pad_id)  # B chosen rows, then B rejected rows
    logp = response_logprobs(policy, rollout)[0].sum(-1)  # (2B,)
    ref = reference.logprobs(rollout).sum(-1).to(logp.device)  # (2B,)
    lengths = rollout.response_mask.sum(-1).view(2, -1).t()  # (B, 2)
    ratio = logp - ref
    return ratio[: len(examples)], ratio[len(examples) :], lengths.to(logp.device)


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, lengths: torch.Tensor, beta: float,
               loss_type: str) -> torch.Tensor:
    """Return the (B,) per-pair losses of `loss_type` from log-ratio sums of the chosen and rejected answers."""
    if loss_type == "sigmoid":  # DPO (Rafailov et al.)
        return -F.logsigmoid(beta * (chosen - rejected))
    if loss_type == "hinge":  # SLiC
        return torch.relu(1 - beta * (chosen - rejected))
    # IPO (Azar et al., eq. 17) on per-token log-ratios, tau = beta
    return (chosen / lengths[:, 0] - rejected / lengths[:, 1] - 1 / (2 * beta)) ** 2


@torch.no_grad()
def held_out_scores(policy: PreTrainedModel, reference: Reference, examples: list[dict], pad_id: int,
                    cfg: AlignConfig) -> dict[str, float]:
    """Return TRL's DPO figures on `examples`: loss, reward accuracy, margin, chosen and rejected reward (means)."""
    policy.eval()
    losses, chosen_rewards, rejected_rewards = [], [], []
    for s in range(0, len(examples), cfg.batch_size):
        chosen, rejected, lengths = log_ratios(policy, reference, examples[s : s + cfg.batch_size], pad_id)
        losses.append(dpo_losses(chosen, rejected, lengths, cfg.beta, cfg.loss_type))
        chosen_rewards.append(cfg.beta * chosen)
        rejected_rewards.append(cfg.beta * rejected)
    loss, chosen, rejected = torch.cat(losses), torch.cat(chosen_rewards), torch.cat(rejected_rewards)
    figures = {
        "loss": loss.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
    }
    return {k: round(float(v), 5) for k, v in figures.items()}


def train_dpo(
    policy: PreTrainedModel,
    reference: Reference,
    tokenizer: PreTrainedTokenizerBase,
    train: list[dict],
    val: list[dict],
    cfg: AlignConfig,
    seed: int,
    checkpoints: LoopCheckpoints | None = None,
) -> tuple[dict, list[float]]:
    """DPO-train `policy` (all weights, or its LoRA adapter) against `reference` for cfg.max_steps.

    Returns (figures, each step's loss). Figures: held-out figures before and
    after (val_<key>_before/after), the mean training loss of the last (up to)
    10 steps, steps, train time.
    """
    check_loss_type(cfg.loss_type)
    max_length = hf_lm.context_length(policy, cfg.max_length)
    train_ex, val_ex = encode_pairs(tokenizer, train, max_length), encode_pairs(tokenizer, val, max_length)
    pad_id = tokenizer.pad_token_id
    before = held_out_scores(policy, reference, val_ex, pad_id, cfg)

    tokens = 0  # this rank's prompt + answer tokens trained on

    def batch_loss(rows: list[int]) -> tuple[torch.Tensor, float]:
        nonlocal tokens
        tokens += sum(2 * len(train_ex[i]["prompt"]) + len(train_ex[i]["chosen"]) + len(train_ex[i]["rejected"])
                      for i in rows)
        chosen, rejected, lengths = log_ratios(policy, reference, [train_ex[i] for i in rows], pad_id)
        return dpo_losses(chosen, rejected, lengths, cfg.beta, cfg.loss_type).sum(), len(rows)

    started = time.time()
    settings = LoopSettings(cfg.max_steps, cfg.batch_size, cfg.learning_rate, seed, checkpoints, cfg.warmup_steps)
    losses = train_loop(policy, batch_loss, len(train_ex), settings, f"dpo ({cfg.loss_type})")
    train_time = time.time() - started
    tokens = int(DataParallel.current().sum(tokens))
    after = held_out_scores(policy, reference, val_ex, pad_id, cfg)
    tail = losses[-10:]
    return {
        "loss_type": cfg.loss_type,
        "steps": len(losses),
        **{f"val_{k.replace('/', '_')}_before": v for k, v in before.items()},
        **{f"val_{k.replace('/', '_')}_after": v for k, v in after.items()},
        "train_loss_end": round(sum(tail) / len(tail), 5) if tail else None,
        "train_time_s": round(train_time, 2),
        "train_tokens": tokens,  # chosen and rejected rows, all ranks, in the steps this run made
        "tokens_per_s": round(tokens / max(train_time, 1e-9), 1),
    }, losses
