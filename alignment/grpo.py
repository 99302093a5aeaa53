"""GRPO (DeepSeekMath): PPO's clipped objective with group-relative advantages and no critic. Our own loop.

Why not TRL's GRPOTrainer: it runs on CPU, but this loop shares its rollouts,
log-probs, reference (LoRA-disabled or frozen copy) and reward functions with
our PPO, so the two methods differ only in what the paper says they differ in,
and the advantage computation is a plain function the tests check by hand.

One iteration: take rollout_size // group_size prompts, sample group_size
responses to each, score them, normalise each score within its group
(A = (r - mean_group) / (std_group + eps), the same A on every token of the
response), then ppo_epochs passes of
  loss = mean_seq mean_tok [ -min(ratio * A, clip(ratio) * A) + kl_coef * k3(pi, pi_ref) ],
k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1, an unbiased, positive KL estimate.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from alignment.policy import response_logprobs
from alignment.ppo import masked_mean
from alignment.rl_loop import RLLoop, RLTask
from alignment.stages import AlignConfig
from recipes.loop_checkpoint import LoopCheckpoints


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Return (N*G,) advantages: each reward minus its group's mean, over the group's std (groups consecutive)."""
    groups = rewards.view(-1, group_size)  # (N, G)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True)  # unbiased, as in the paper's code and TRL
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Return the per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 where equal)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    kl_coef: float,
    responses: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (GRPO loss, mean per-token k3 KL); log-probs and mask (B, R), advantages (B,).

    Each response's token losses are averaged over its tokens, then over
    responses (over `responses` where given: a rank's share of a minibatch).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, R)
    adv = advantages.unsqueeze(-1)  # (B, 1): one advantage for the whole response
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -surrogate + kl_coef * kl  # (B, R)
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    return per_sequence.sum() / (responses or per_sequence.numel()), masked_mean(kl, mask)


def train_grpo(
    policy: PreTrainedModel, task: RLTask, cfg: AlignConfig, seed: int, checkpoints: LoopCheckpoints | None = None
) -> list[dict]:
    """Train `policy` with GRPO for cfg.rl_iterations; return each iteration's figures.

    Figures: reward (mean score), reward_std_in_group (mean within-group std:
    0 means no learning signal), kl (mean per-sequence sum of log pi - log
    pi_ref on the samples), entropy, loss, response length. Data parallel and
    checkpointed as PPO (alignment.rl_loop): group statistics are taken over
    the gathered scores, so a group may span ranks.
    """
    loop = RLLoop(checkpoints, seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    groups = max(cfg.rollout_size // cfg.group_size, 1)
    modules, optimizers = {"policy": policy}, {"adamw": optimizer}
    loop.restore(modules, optimizers)
    for iteration in (bar := loop.iterations(cfg.rl_iterations, "grpo")):
        # each prompt group_size times in a row
        scored = loop.rollout(task, policy, iteration, groups, cfg.max_new_tokens, repeat=cfg.group_size)
        rollout, mask, old_logprobs, ref_logprobs = scored.rollout, scored.mask, scored.logprobs, scored.ref_logprobs
        scores = scored.scores
        advantages = group_advantages(scores, cfg.group_size)  # (B,)
        policy.train()
        losses = []
        for rows, mine in loop.minibatches(rollout.input_ids.size(0), cfg.ppo_epochs, cfg.batch_size):
            logprobs, _ = response_logprobs(policy, rollout.select(mine))
            loss, _ = grpo_loss(
                logprobs, old_logprobs[mine], ref_logprobs[mine], advantages[mine], mask[mine],
                cfg.clip_range, cfg.kl_coef, len(rows),
            )
            loop.step(loss, params, optimizer)
            losses.append(loop.dp.sum(loss.item()))
        policy.eval()
        entry = {
            "iteration": iteration,
            "reward": scores.mean().item(),
            "reward_std_in_group": scores.view(-1, cfg.group_size).std(-1).mean().item(),
            "kl": ((old_logprobs - ref_logprobs) * mask).sum(-1).mean().item(),
            "entropy": masked_mean(scored.entropy, mask).item(),
            "response_tokens": mask.sum(-1).mean().item(),
            "loss": sum(losses) / len(losses),
        }
        bar.set_postfix(reward=f"{entry['reward']:.3f}", kl=f"{entry['kl']:.3f}")
        loop.finish(iteration, entry, modules, optimizers)
    return loop.log
