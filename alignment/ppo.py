"""PPO for RLHF (InstructGPT recipe), our own: TRL removed its PPOTrainer.

One iteration:
  1. rollout: sample a response to each of `rollout_size` prompts from the policy (HF generate, KV cache);
  2. score: log-probs of the policy and of the frozen reference, the critic's values, the reward's score;
  3. per-token reward: -kl_coef * (log pi - log pi_ref) on every response token, + score on the last one;
  4. advantages and returns by GAE over the response tokens, advantages whitened;
  5. ppo_epochs passes over the rollout in minibatches: clipped policy loss (policy optimizer),
     clipped value loss (critic optimizer);
  6. the KL coefficient adapts toward kl_target (Ziegler et al. 2019) or stays fixed.

The actor is the policy (a LoRA adapter or all weights), the critic a
separate sequence-scoring model initialised from the reward model whose head
gives a value at every position.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from alignment.policy import response_logprobs, response_values
from alignment.rl_loop import RLLoop, RLTask
from alignment.stages import AlignConfig
from recipes.loop_checkpoint import LoopCheckpoints


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Return the mean of `x` over positions where `mask` is 1 (over `total` positions where given: a rank's
    share of a data-parallel batch divides its sum by the whole batch's count)."""
    return (x * mask).sum() / (total if total is not None else mask.sum().clamp(min=1))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Return `x` shifted and scaled to mean 0 and variance 1 over the masked positions (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Return (B, R) per-token rewards: -kl_coef * (log pi - log pi_ref), plus the (B,) score on each last token."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask  # (B, R)
    last = mask.sum(-1).long() - 1  # (B,)
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (advantages, returns), both (B, R), by generalised advantage estimation; 0 past each response.

    delta_t = r_t + gamma * V_{t+1} - V_t (V = 0 past the last token),
    A_t = delta_t + gamma * lam * A_{t+1}, returns = A + V.
    """
    rewards, values = rewards * mask, values * mask  # (B, R): nothing past each response's end
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,): A_{t+1}
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float,
    total: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (PPO's clipped surrogate loss, share of tokens whose ratio was clipped), token means over `mask`
    (over `total` tokens where given, see masked_mean).

    loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))), ratio = pi / pi_old.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, R)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, total)
    return loss, masked_mean((clipped > unclipped).float(), mask, total)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
    total: float | None = None,
) -> torch.Tensor:
    """Return PPO's clipped value loss 0.5 * mean(max((V - G)^2, (V_clipped - G)^2)), V_clipped within clip of V_old."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, total)


class KLController:
    """The KL coefficient: fixed when target is 0, else adapted toward `target` KL per sequence (Ziegler et al.)."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, samples: int) -> None:
        """Scale the coefficient by 1 + clip(kl / target - 1, -0.2, 0.2) * samples / horizon (no-op when fixed)."""
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * samples / self.horizon


def train_ppo(
    policy: PreTrainedModel, critic: PreTrainedModel, task: RLTask, cfg: AlignConfig, seed: int,
    checkpoints: LoopCheckpoints | None = None,
) -> list[dict]:
    """Train `policy` (and `critic`) with PPO for cfg.rl_iterations; return each iteration's figures.

    Figures: reward (mean score of the rollouts), kl (mean per-sequence sum of
    log pi - log pi_ref on them), kl_coef, entropy (mean per token), policy and
    value loss, clip fraction, response length.

    Data parallel (RLLoop): each rank samples and scores its share of the
    rollout, every rank then holds the whole rollout and its scores, and
    trains on its share of each minibatch. With `checkpoints` it saves the
    policy, the critic, both optimizers and the KL controller every
    checkpoint_every iterations and resumes from the newest.
    """
    loop = RLLoop(checkpoints, seed)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    policy_opt = torch.optim.AdamW(policy_params, lr=cfg.learning_rate, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.rm_learning_rate, weight_decay=0.0)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    modules, optimizers = {"policy": policy, "critic": critic}, {"policy": policy_opt, "critic": critic_opt}
    state = loop.restore(modules, optimizers)
    if state:
        kl_ctl.value = state["kl_coef"]
    for iteration in (bar := loop.iterations(cfg.rl_iterations, "ppo")):
        # 1-2. rollout and its scores, all without gradients
        scored = loop.rollout(task, policy, iteration, cfg.rollout_size, cfg.max_new_tokens)
        rollout, mask, old_logprobs, ref_logprobs = scored.rollout, scored.mask, scored.logprobs, scored.ref_logprobs
        (old_values,) = loop.scored(rollout, lambda part: (response_values(critic.eval(), part),))  # (B, R)
        scores, batch = scored.scores, rollout.input_ids.size(0)
        # 3-4. per-token rewards with the KL penalty, GAE
        rewards = kl_penalised_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        advantages = masked_whiten(advantages, mask)
        # 5. PPO epochs over minibatches, each rank its share of each
        policy.train()
        critic.train()
        stats = {"policy_loss": [], "value_loss": [], "clipfrac": []}
        for rows, mine in loop.minibatches(batch, cfg.ppo_epochs, cfg.batch_size):
            sub, m, tokens = rollout.select(mine), mask[mine], float(mask[rows].sum().clamp(min=1))
            logprobs, _ = response_logprobs(policy, sub)
            policy_loss, clipfrac = clipped_policy_loss(
                logprobs, old_logprobs[mine], advantages[mine], m, cfg.clip_range, tokens
            )
            loop.step(policy_loss, policy_params, policy_opt)
            values = response_values(critic, sub)
            value_loss = clipped_value_loss(values, old_values[mine], returns[mine], m, cfg.value_clip_range, tokens)
            loop.step(value_loss, list(critic.parameters()), critic_opt)
            for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss), ("clipfrac", clipfrac)):
                stats[key].append(loop.dp.sum(value.item()))
        policy.eval()
        critic.eval()
        # 6. KL of this rollout (per sequence) drives the adaptive coefficient
        kl = ((old_logprobs - ref_logprobs) * mask).sum(-1).mean().item()
        entry = {
            "iteration": iteration,
            "reward": scores.mean().item(),
            "kl": kl,
            "kl_coef": kl_ctl.value,
            "entropy": masked_mean(scored.entropy, mask).item(),
            "response_tokens": mask.sum(-1).mean().item(),
            **{key: sum(v) / len(v) for key, v in stats.items()},
        }
        kl_ctl.update(kl, batch)
        bar.set_postfix(reward=f"{entry['reward']:.3f}", kl=f"{kl:.3f}", vloss=f"{entry['value_loss']:.3f}")
        loop.finish(iteration, entry, modules, optimizers, {"kl_coef": kl_ctl.value})
    return loop.log
