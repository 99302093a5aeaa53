"""The align stage: preference pairs, TRL's DPO loss against a hand computation, learning, the stage run."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from alignment.dpo import held_out_scores, make_trainer
from alignment.preference_data import build_pairs, read_pairs
from alignment.stages import AlignConfig
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm
from recipes.instructions import continuations, write_jsonl
from tiny_lm import build_model, build_tokenizer, doc_paragraphs, save_hf, write_corpus, write_upstream

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def docs():
    return doc_paragraphs()


def split(pairs):
    return [p for p in pairs if p["split"] == "train"], [p for p in pairs if p["split"] == "val"]


def test_pairs_are_seeded_and_corrupt_only_the_rejected_answer(docs):
    pairs = build_pairs(docs[:300], seed=3, heldout_fraction=0.2, rejected="shuffled", chat_chars=320)
    assert pairs == build_pairs(docs[:300], seed=3, heldout_fraction=0.2, rejected="shuffled", chat_chars=320)
    truth = {c.doc_id: c for c in continuations(docs[:300], 3, 320)}
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert chosen == truth[p["id"]].continuation and truth[p["id"]].context in p["prompt"][0]["content"]
        assert rejected != chosen and Counter(rejected.split()) == Counter(chosen.split())
    train, val = split(pairs)
    assert train and val and not {p["id"] for p in train} & {p["id"] for p in val}

    unrelated = build_pairs(docs[:300], seed=3, heldout_fraction=0.2, rejected="unrelated", chat_chars=320)
    others = {c.continuation for c in truth.values()}
    assert all(p["rejected"][0]["content"] in others - {p["chosen"][0]["content"]} for p in unrelated)
    with pytest.raises(ValueError, match="unknown rejected kind"):
        build_pairs(docs[:10], 3, 0.2, "reversed", 320)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"chosen": []}, "'chosen' must be a list of one assistant message"),
        ({"rejected": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
        ({"prompt": [{"role": "assistant", "content": "x"}]}, "opens with an assistant turn"),
        ({"split": "dev"}, "'split' must be one of"),
        ({"rejected": "same"}, "must be a list of one assistant message"),
    ],
)
def test_malformed_pairs_are_rejected(docs, tmp_path, change, message):
    good = build_pairs(docs[:20], 1, 0.0, "shuffled", 320)[0]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {**good, **change}])
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(path)
    assert f"{path}:2" in str(err.value)
    write_jsonl(path, [good, {**good, "rejected": good["chosen"]}])
    with pytest.raises(ValueError, match="the same answer"):
        read_pairs(path)


def sequence_logp(model, prompt_ids: list[int], full_ids: list[int]) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens full_ids[len(prompt_ids):], one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0]  # (T, V)
    logp = F.log_softmax(logits.double(), dim=-1)
    return sum(logp[t - 1, full_ids[t]] for t in range(len(prompt_ids), len(full_ids)))


def test_trl_dpo_loss_equals_hand_computation(tokenizer, docs, tmp_path):
    pairs = build_pairs(docs[:40], 2, 0.0, "shuffled", 320)[:3]
    cfg = AlignConfig(beta=0.3, max_length=512)
    policy, reference = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    trainer = make_trainer(policy, reference, tokenizer, pairs, pairs[:1], cfg, 0, tmp_path / "trainer")
    features = [trainer.train_dataset[i] for i in range(len(pairs))]
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(features)).item()

    losses = []
    for pair, feature in zip(pairs, features):
        prompt = hf_lm.chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
        chosen = hf_lm.chat_ids(tokenizer, pair["prompt"] + pair["chosen"])
        rejected = hf_lm.chat_ids(tokenizer, pair["prompt"] + pair["rejected"])
        # TRL tokenizes the pairs as our chat encoding does.
        assert feature["prompt_ids"] == prompt and prompt + feature["chosen_ids"] == chosen
        margin = (sequence_logp(policy, prompt, chosen) - sequence_logp(reference, prompt, chosen)) - (
            sequence_logp(policy, prompt, rejected) - sequence_logp(reference, prompt, rejected)
        )
        losses.append(-F.logsigmoid(cfg.beta * margin))
    hand_loss = torch.stack(losses).mean().item()
    assert abs(hand_loss - 0.6931) > 1e-3  # policy and reference differ, so the check is not vacuous
    assert trl_loss == pytest.approx(hand_loss, abs=1e-5)


def test_planted_preference_is_learned(tokenizer, docs, tmp_path):
    # Chosen: the real next sentence; rejected: its words shuffled. A tiny random model learns the order.
    train, val = split(build_pairs(docs[:600], 5, 0.2, "shuffled", 320))
    cfg = AlignConfig(max_steps=25, batch_size=4, learning_rate=5e-3, warmup_steps=2, max_length=128)
    model = build_model(tokenizer)
    trainer = make_trainer(model, build_model(tokenizer), tokenizer, train, val[:32], cfg, 0, tmp_path / "trainer")
    before = held_out_scores(trainer)
    trainer.train()
    after = held_out_scores(trainer)
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0  # policy == reference
    assert after["rewards/accuracies"] >= 0.75 and after["rewards/margins"] > 0.2
    assert after["loss"] < before["loss"]


def stage_inputs(run_dir, configs, tokenizer, docs):
    write_corpus(run_dir / "curate" / "corpus", docs[:400])
    write_upstream(run_dir, configs, "curate", {"corpus": "corpus"})
    save_hf(run_dir / "sft" / "hf", build_model(tokenizer, positions=64), tokenizer)  # as smoke's micro
    write_upstream(run_dir, configs, "sft", {"hf": "hf"})


def test_align_stage_through_the_runner(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["align.learning_rate=1e-3"])
    stage_inputs(run_dir, configs, tokenizer, docs)

    manifest = execute_stage(str(run_dir), "align", configs_to_json(configs))

    out = run_dir / "align"
    assert set(manifest["outputs"]) == {"hf", "pairs"}
    m = manifest["metrics"]
    assert m["steps"] == 5 and m["train_pairs"] == 32 and m["val_pairs"] > 0
    assert m["val_rewards_accuracies_before"] == 0.0 and m["val_loss_before"] == pytest.approx(0.6931, abs=1e-4)
    assert m["val_rewards_margins_after"] != 0.0
    json.dumps(m)
    pairs = read_pairs(out / "pairs.jsonl")
    assert sum(p["split"] == "train" for p in pairs) == 32
    assert m["max_length"] == 64 and m["dropped_prompt_too_long"] > 0
    assert all(len(hf_lm.chat_ids(tokenizer, p["prompt"], add_generation_prompt=True)) <= 48 for p in pairs)
    assert not (out / "trainer").exists()

    aligned = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "hf", dtype=torch.float32)
    changed = [n for n, p in aligned.state_dict().items() if not torch.equal(p, sft.state_dict()[n])]
    assert changed  # DPO trained the policy
    assert (out / "hf" / "tokenizer_config.json").is_file()


def test_align_fails_clearly_for_other_methods(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["align.method=ppo"])
    stage_inputs(run_dir, configs, tokenizer, docs)
    with pytest.raises(ValueError, match=r"align.method='ppo' is not implemented; available: dpo"):
        execute_stage(str(run_dir), "align", configs_to_json(configs))
