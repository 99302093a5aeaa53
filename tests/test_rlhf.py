"""RLHF: rollouts against per-row peers, the reward model, PPO's GAE / clipped losses / KL penalty by hand,
GRPO's group advantages and loss by hand, short PPO and GRPO runs that learn a planted reward, the stage run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignment.grpo import grpo_loss, group_advantages, train_grpo
from alignment.policy import Reference, generate, pack, prompt_ids, response_logprobs
from alignment.ppo import KLController, clipped_policy_loss, clipped_value_loss, gae, kl_penalised_rewards, train_ppo
from alignment.preference_data import build_pairs
from alignment.reward_model import LoopSettings, encode_pairs, pairwise_accuracy, train_reward_model
from alignment.rewards import function_reward, import_function, model_reward
from alignment.rl_loop import RLTask
from alignment.stages import AlignConfig
from curation.split import by_hash
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm
from test_align import stage_inputs
from tiny_lm import build_model, save_hf

torch.set_num_threads(1)


def short_is_better(prompts: list[str], completions: list[str]) -> list[float]:
    """A planted reward: minus the completion's length in characters / 20."""
    return [-len(c) / 20 for c in completions]


def user_prompts(tokenizer, docs, n: int) -> list[list[int]]:
    return [prompt_ids(tokenizer, [{"role": "user", "content": d["text"][:80]}]) for d in docs[:n]]


# --- rollouts ------------------------------------------------------------------------------------


def test_batched_rollouts_match_one_row_at_a_time(tokenizer, docs):
    model = build_model(tokenizer)
    texts = [d["text"][:n] for d, n in zip(docs[:3], (20, 90, 45))]  # prompts of different lengths: left padding
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    greedy = generate(model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, sample=False)
    for text, response in zip(texts, greedy.responses()):  # peer: hf_lm's unbatched greedy reply
        assert tokenizer.decode(response, skip_special_tokens=True) == hf_lm.greedy_reply(model, tokenizer, text, 12)

    torch.manual_seed(0)
    sampled = generate(model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, sample=True)
    logprobs, entropy = response_logprobs(model, sampled)  # (B, R)
    mask = sampled.response_mask
    assert torch.all(logprobs[mask == 0] == 0) and torch.all(entropy[mask == 0] == 0)
    for row, (prompt, response) in enumerate(zip(prompts, sampled.responses())):
        with torch.no_grad():  # peer: one unpadded sequence, default positions
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        logp = torch.log_softmax(logits, -1)
        expected = [logp[len(prompt) + t - 1, tok] for t, tok in enumerate(response)]
        assert torch.allclose(logprobs[row, : len(response)], torch.stack(expected), atol=1e-4)


# --- reward model --------------------------------------------------------------------------------


def test_reward_model_scores_like_hf_and_learns_a_planted_preference(tokenizer, docs, tmp_path):
    save_hf(tmp_path / "sft", build_model(tokenizer, seed=3), tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sft", num_labels=1, dtype=torch.float32)
    pairs = build_pairs(docs[:600], 5, by_hash(5, 0.2), "shuffled", 160)  # chosen: the real sentence; rejected: its words shuffled
    train = encode_pairs(tokenizer, [p for p in pairs if p["split"] == "train"], 128)
    val = encode_pairs(tokenizer, [p for p in pairs if p["split"] == "val"][:32], 128)

    reward = model_reward(model)  # peer: HF's own pooling at the last non-pad token, unpadded rows
    batch = pack([e["prompt"] for e in val[:3]], [e["chosen"] for e in val[:3]], tokenizer.pad_token_id)
    with torch.no_grad():
        hf_scores = [model(input_ids=torch.tensor([e["prompt"] + e["chosen"]])).logits[0, 0] for e in val[:3]]
    assert torch.allclose(reward(batch), torch.stack(hf_scores), atol=1e-5)

    losses = train_reward_model(model, train, tokenizer.pad_token_id, LoopSettings(60, 8, 2e-3, 0))
    after = pairwise_accuracy(model, val, tokenizer.pad_token_id, 16)
    assert sum(losses[-5:]) / 5 < math.log(2) - 0.1  # below chance's Bradley-Terry loss
    assert after["accuracy"] >= 0.8 and after["margin"] > 0


# --- PPO pieces, by hand -------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after its second token
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: deltas 0.9, 0.9*0.1-0.2 = -0.11, 0.9*0.2-0.5 = -0.32; A_t = delta_t + 0.45 A_{t+1}
    # row 2: deltas 2-1 = 1, 0.9*1-1 = -0.1; nothing past the end
    expected = torch.tensor([[-0.32 + 0.45 * (-0.11 + 0.45 * 0.9), -0.11 + 0.45 * 0.9, 0.9], [-0.1 + 0.45, 1.0, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 50.0]]))  # ratios; the 4th token is padding
    advantages = torch.tensor([[1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # max(-A r, -A clip(r)): (-1.5, -1.2) -> -1.2 clipped; (-0.5, -0.8) -> -0.5; (1.1, 1.1) -> 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_clipped_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 0.0, 7.0]]), torch.tensor([[0.5, 0.5, 0.0]])
    returns, mask = torch.tensor([[2.0, 0.4, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # token 1: V 1.0 -> clipped 0.7: max(1, 1.69); token 2: V 0.0 -> clipped 0.3: max(0.16, 0.01)
    loss = clipped_value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.16) / 2, abs=1e-6)


def test_kl_penalty_is_applied_to_every_token_and_the_score_to_the_last():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [0.0, -0.2 - 1.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_kl_controller_adapts_toward_target_or_stays_fixed():
    adaptive = KLController(0.1, target=1.0, horizon=100)
    adaptive.update(kl=3.0, samples=10)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(kl=0.5, samples=10)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1, target=0.0, horizon=100)
    fixed.update(kl=30.0, samples=10)
    assert fixed.value == 0.1


# --- GRPO pieces, by hand ------------------------------------------------------------------------


def test_group_advantages_by_hand():
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    # group 1: mean 2, unbiased std 1; group 2: all equal, no signal
    assert torch.allclose(advantages, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]), atol=1e-6)


def test_grpo_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0], [-2.0, -2.0]])  # token (0, 0): ratio e^0.5, clipped to 1.2 for A > 0
    ref = torch.tensor([[-1.0, -0.5], [-2.0, 0.0]])
    advantages, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, kl = grpo_loss(logprobs, old, ref, advantages, mask, clip=0.2, kl_coef=0.1)
    k3 = math.exp(0.5) - 0.5 - 1  # the only masked-in token whose reference differs
    row1 = (-1.2 + (-1.0 + 0.1 * k3)) / 2
    row2 = 1.0  # -min(1 * -1, 1 * -1)
    assert loss.item() == pytest.approx((row1 + row2) / 2, abs=1e-6)
    assert kl.item() == pytest.approx(k3 / 3, abs=1e-6)


# --- short runs that learn a planted reward ------------------------------------------------------


def mean_response_chars(model, tokenizer, prompts) -> float:
    torch.manual_seed(1)
    rollout = generate(model, prompts, 16, tokenizer.eos_token_id, tokenizer.pad_token_id, sample=True)
    return sum(len(tokenizer.decode(r)) for r in rollout.responses()) / len(prompts)


def rl_config(**overrides) -> AlignConfig:
    settings = dict(rollout_size=16, group_size=4, batch_size=8, ppo_epochs=2, max_new_tokens=16, kl_coef=0.01)
    return AlignConfig(**{**settings, **overrides})


def test_ppo_learns_a_planted_reward(tokenizer, docs, tmp_path):
    save_hf(tmp_path / "rm", build_model(tokenizer, seed=4), tokenizer)
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1, dtype=torch.float32)
    policy, reference = build_model(tokenizer), build_model(tokenizer)
    prompts = user_prompts(tokenizer, docs, 32)
    before = mean_response_chars(policy, tokenizer, prompts)
    reward = function_reward(import_function("test_rlhf:short_is_better"), tokenizer)
    cfg = rl_config(rl_iterations=10, learning_rate=1e-2, rm_learning_rate=1e-3)
    task = RLTask(prompts, reward, Reference(policy, reference), tokenizer.eos_token_id, tokenizer.pad_token_id)
    log = train_ppo(policy, critic, task, cfg, seed=0)
    assert len(log) == 10 and log[0]["kl"] == 0.0  # the reference is an exact copy before the first update
    assert log[-1]["kl"] != 0.0 and all(e["entropy"] > 0 and e["kl_coef"] == 0.01 for e in log)
    assert sum(e["reward"] for e in log[-3:]) / 3 > sum(e["reward"] for e in log[:3]) / 3 + 0.3
    assert log[-1]["value_loss"] < log[0]["value_loss"]
    assert mean_response_chars(policy, tokenizer, prompts) < before


def test_grpo_learns_a_planted_reward(tokenizer, docs):
    policy, reference = build_model(tokenizer), build_model(tokenizer)
    prompts = user_prompts(tokenizer, docs, 32)
    task = RLTask(prompts, function_reward(short_is_better, tokenizer), Reference(policy, reference),
                  tokenizer.eos_token_id, tokenizer.pad_token_id)
    log = train_grpo(policy, task, rl_config(rl_iterations=10, learning_rate=1e-2), seed=0)
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] != 0.0
    assert sum(e["reward"] for e in log[-3:]) / 3 > sum(e["reward"] for e in log[:3]) / 3 + 0.3


def test_lora_policy_reference_is_its_base_with_adapters_disabled(tokenizer, docs):
    policy = hf_lm.add_lora(build_model(tokenizer), rank=8, alpha=16)
    reference = Reference(policy)
    base = build_model(tokenizer)  # the same seed: the weights under the adapter
    prompts = user_prompts(tokenizer, docs, 16)
    task = RLTask(prompts, function_reward(short_is_better, tokenizer), reference, tokenizer.eos_token_id,
                  tokenizer.pad_token_id)
    log = train_grpo(policy, task, rl_config(rl_iterations=3, learning_rate=3e-2), seed=0)
    assert log[0]["kl"] == 0.0  # a fresh adapter (B = 0) changes nothing
    torch.manual_seed(0)
    rollout = generate(policy, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, sample=True)
    with torch.no_grad():
        trained, _ = response_logprobs(policy, rollout)
        untouched, _ = response_logprobs(base, rollout)
    assert torch.allclose(reference.logprobs(rollout), untouched, atol=1e-5)
    assert not torch.allclose(trained, untouched, atol=1e-3)  # the adapter did train
    with pytest.raises(ValueError, match="needs a LoRA"):
        Reference(base)


# --- the stage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_rl_methods_through_the_runner(tmp_path, tokenizer, docs, method):
    run_dir = tmp_path / "run"
    overrides = [f"align.method={method}", "align.rm_steps=10", "align.rl_iterations=3", "align.rollout_size=8",
                 "align.judge_prompts=4", "align.learning_rate=1e-3"]
    configs = resolve_configs("smoke", overrides)
    stage_inputs(run_dir, configs, tokenizer, docs)

    manifest = execute_stage(str(run_dir), "align", configs_to_json(configs))

    out, m = run_dir / "align", manifest["metrics"]
    expected = {"hf", "pairs", "reward_model", "train_log"} | ({"critic"} if method == "ppo" else set())
    assert set(manifest["outputs"]) == expected
    assert m["method"] == method and m["steps"] == 3 and m["rl_reward_source"] == "reward_model"
    assert m["rl_kl_first"] == 0.0 and {"win_rate_vs_sft", "judge_score_aligned", "kl_from_reference"} <= set(m)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {e["phase"] for e in log} == {"reward_model", method}
    log = [e for e in log if e["phase"] == method]
    assert [e["iteration"] for e in log] == [0, 1, 2] and all("entropy" in e and "kl" in e for e in log)
    if method == "ppo":
        assert all("value_loss" in e for e in log)
        critic = AutoModelForSequenceClassification.from_pretrained(out / "critic", dtype=torch.float32)
        assert critic.config.num_labels == 1


def test_unknown_reward_function_fails_clearly(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["align.method=grpo", "align.reward_fn=no_module_here", "align.rm_steps=2"])
    stage_inputs(run_dir, configs, tokenizer, docs)
    with pytest.raises(ValueError, match="must be named 'package.module:function'"):
        execute_stage(str(run_dir), "align", configs_to_json(configs))
