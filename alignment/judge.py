"""The aligned model against the SFT model on held-out prompts, judged by the reward model; KL from the reference.

Both models sample one answer to each prompt (temperature 1, the
distribution RL optimises; torch's RNG seeded alike for both); the reward
model scores both answers to the plain prompt; a win is a higher score (a
tie counts half). KL(pi || pi_ref) is estimated on the aligned model's
answers: the mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t), in
nats per response. The policy may see a different prompt than the reference
(SteerLM adds the requested attributes); its answer is judged as an answer
to the plain prompt.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from alignment.policy import Reference, generate, pack, response_logprobs
from alignment.rewards import RewardFn


@torch.no_grad()
def judge(
    policy: PreTrainedModel,
    reference: Reference,
    reward: RewardFn,
    policy_prompts: list[list[int]],
    plain_prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    seed: int,
) -> dict[str, float]:
    """Return judge figures: score_sft, score_aligned, win_rate_vs_sft, kl_from_reference, response tokens of each."""
    torch.manual_seed(seed)
    with reference.active() as sft:
        sft_answers = generate(sft, plain_prompts, max_new_tokens, eos_id, pad_id, sample=True)
    torch.manual_seed(seed)
    sampled = generate(policy, policy_prompts, max_new_tokens, eos_id, pad_id, sample=True)
    aligned_answers = pack(plain_prompts, sampled.responses(), pad_id)
    sft_scores, aligned_scores = reward(sft_answers), reward(aligned_answers)  # (N,) each
    wins = (aligned_scores > sft_scores).float() + 0.5 * (aligned_scores == sft_scores).float()

    logprobs, _ = response_logprobs(policy, sampled)  # (N, R)
    ref_logprobs = reference.logprobs(aligned_answers)  # (N, R)
    return {
        "judge_score_sft": sft_scores.mean().item(),
        "judge_score_aligned": aligned_scores.mean().item(),
        "win_rate_vs_sft": wins.mean().item(),
        "kl_from_reference": (logprobs - ref_logprobs).sum(-1).mean().item(),
        "response_tokens_sft": sft_answers.response_mask.sum(-1).mean().item(),
        "response_tokens_aligned": sampled.response_mask.sum(-1).mean().item(),
    }
