"""The align stage: preference pairs (built and user files), our DPO losses against TRL's and hand computations,
the LoRA reference, learning, the stage run (dpo; tests/test_rlhf.py and test_steerlm.py run the others)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.dpo import dpo_losses, log_ratios, train_dpo
from alignment.policy import Reference
from alignment.preference_data import build_pairs, read_pairs, read_user_pairs
from alignment.reward_model import encode_pairs
from alignment.stages import AlignConfig
from curation.split import by_hash
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm
from recipes.instructions import continuations, write_jsonl
from tiny_lm import build_model, save_hf, write_corpus_upstream, write_upstream

torch.set_num_threads(1)


def split(pairs):
    return [p for p in pairs if p["split"] == "train"], [p for p in pairs if p["split"] == "val"]


def test_pairs_are_seeded_and_corrupt_only_the_rejected_answer(docs):
    pairs = build_pairs(docs[:300], seed=3, split_of=by_hash(3, 0.2), rejected="shuffled", chat_chars=320)
    assert pairs == build_pairs(docs[:300], seed=3, split_of=by_hash(3, 0.2), rejected="shuffled", chat_chars=320)
    truth = {c.doc_id: c for c in continuations(docs[:300], 3, 320)}
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert chosen == truth[p["id"]].continuation and truth[p["id"]].context in p["prompt"][0]["content"]
        assert rejected != chosen and Counter(rejected.split()) == Counter(chosen.split())
    train, val = split(pairs)
    assert train and val and not {p["id"] for p in train} & {p["id"] for p in val}

    unrelated = build_pairs(docs[:300], seed=3, split_of=by_hash(3, 0.2), rejected="unrelated", chat_chars=320)
    others = {c.continuation for c in truth.values()}
    assert all(p["rejected"][0]["content"] in others - {p["chosen"][0]["content"]} for p in unrelated)
    with pytest.raises(ValueError, match="unknown rejected kind"):
        build_pairs(docs[:10], 3, by_hash(3, 0.2), "reversed", 320)


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
    good = build_pairs(docs[:20], 1, by_hash(1, 0.0), "shuffled", 320)[0]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {**good, **change}])
    with pytest.raises(ValueError, match=message) as err:
        read_pairs(path)
    assert f"{path}:2" in str(err.value)
    write_jsonl(path, [good, {**good, "rejected": good["chosen"]}])
    with pytest.raises(ValueError, match="the same answer"):
        read_pairs(path)


def test_user_pairs_in_text_and_chat_form(tmp_path):
    text = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    chat = {
        "id": "c1",
        "split": "val",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
        "chosen": [{"role": "assistant", "content": "Apple."}],
        "rejected": [{"role": "assistant", "content": "Tuesday."}],
    }
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(text) + "\n\n" + json.dumps(chat) + "\n")
    first, second = read_user_pairs([str(path)], seed=0, heldout_fraction=0.0)
    assert first == {
        "id": "prefs-0",
        "split": "train",
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    }
    assert second == chat
    assert read_user_pairs([str(path)], seed=0, heldout_fraction=1.0)[0]["split"] == "val"


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ('{"prompt": "p", "chosen": "a"}', "missing 'rejected'"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "the same answer"),
        ('{"prompt": "p", "chosen": "", "rejected": "b"}', "non-empty string 'content'"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "split": "test"}', "'split' must be one of"),
        ('{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "last message must be"),
    ],
)
def test_malformed_user_pairs_name_their_line(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_user_pairs([str(path)], 0, 0.1)
    assert f"{path}:2" in str(err.value)


def sequence_logp(model, prompt_ids: list[int], full_ids: list[int]) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens full_ids[len(prompt_ids):], one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0]  # (T, V)
    logp = F.log_softmax(logits.double(), dim=-1)
    return sum(logp[t - 1, full_ids[t]] for t in range(len(prompt_ids), len(full_ids)))


def hand_dpo_loss(loss_type: str, beta: float, chosen: torch.Tensor, rejected: torch.Tensor, lengths) -> torch.Tensor:
    """The per-pair losses of the papers from log-ratio sums log pi/pi_ref of chosen and rejected answers."""
    if loss_type == "sigmoid":  # DPO (Rafailov et al.)
        return -F.logsigmoid(beta * (chosen - rejected))
    if loss_type == "hinge":  # SLiC
        return torch.relu(1 - beta * (chosen - rejected))
    # IPO (Azar et al., eq. 17) on per-token log-ratios, with tau = beta
    return (chosen / lengths[0] - rejected / lengths[1] - 1 / (2 * beta)) ** 2


def trl_dpo_loss(policy, reference, tokenizer, pairs, cfg, work_dir) -> tuple[float, list]:
    """Return (TRL's DPOTrainer loss on `pairs` in one batch, its tokenized features): the peer's figure."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(work_dir), beta=cfg.beta, loss_type=[cfg.loss_type], max_length=cfg.max_length,
                     bf16=False, fp16=False, activation_checkpointing=False, report_to="none",
                     dataloader_pin_memory=False, save_strategy="no")
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = DPOTrainer(model=policy, ref_model=reference.requires_grad_(False).eval(), args=args,
                         train_dataset=data, processing_class=tokenizer)
    features = [trainer.train_dataset[i] for i in range(len(pairs))]
    return trainer.compute_loss(trainer.model, trainer.data_collator(features)).item(), features


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_equal_trl_and_hand_computation(tokenizer, docs, tmp_path, loss_type):
    pairs = build_pairs(docs[:40], 2, by_hash(2, 0.0), "shuffled", 320)[:3]
    cfg = AlignConfig(beta=0.3, max_length=512, loss_type=loss_type)
    policy, reference = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    with torch.no_grad():
        ours = dpo_losses(*log_ratios(policy.eval(), Reference(policy, reference), encode_pairs(tokenizer, pairs, 512),
                                      tokenizer.pad_token_id), cfg.beta, loss_type).mean().item()
    trl_loss, features = trl_dpo_loss(policy, reference, tokenizer, pairs, cfg, tmp_path / "trl")

    def hand_loss(template: bool) -> float:
        """The papers' loss by hand over the chat template's answer tokens (TRL's) or up to its eos (ours)."""
        losses = []
        for pair, feature in zip(pairs, features):
            prompt = hf_lm.chat_ids(tokenizer, pair["prompt"], add_generation_prompt=True)
            chosen = hf_lm.chat_ids(tokenizer, pair["prompt"] + pair["chosen"])
            rejected = hf_lm.chat_ids(tokenizer, pair["prompt"] + pair["rejected"])
            assert feature["prompt_ids"] == prompt and prompt + feature["chosen_ids"] == chosen  # TRL: the template
            if not template:  # ours: the answer as the model emits it, ending at eos (not the template's "\n" after)
                chosen, rejected = (c[: c.index(tokenizer.eos_token_id, len(prompt)) + 1] for c in (chosen, rejected))
            chosen_ratio = sequence_logp(policy, prompt, chosen) - sequence_logp(reference, prompt, chosen)
            rejected_ratio = sequence_logp(policy, prompt, rejected) - sequence_logp(reference, prompt, rejected)
            lengths = (len(chosen) - len(prompt), len(rejected) - len(prompt))
            losses.append(hand_dpo_loss(loss_type, cfg.beta, chosen_ratio, rejected_ratio, lengths))
        return torch.stack(losses).mean().item()

    untrained = hand_dpo_loss(loss_type, cfg.beta, torch.tensor(0.0), torch.tensor(0.0), (1, 1)).item()
    assert abs(hand_loss(False) - untrained) > 1e-3  # policy and reference differ, so the check is not vacuous
    assert ours == pytest.approx(hand_loss(False), rel=1e-5, abs=1e-5)
    assert trl_loss == pytest.approx(hand_loss(True), rel=1e-5, abs=1e-5)  # the peer computes the same formula


def test_lora_dpo_reference_is_the_base_with_adapters_disabled(tokenizer, docs):
    train, val = split(build_pairs(docs[:300], 5, by_hash(5, 0.2), "shuffled", 320))
    cfg = AlignConfig(max_steps=8, batch_size=4, learning_rate=5e-3, warmup_steps=1, max_length=128, lora=True)
    base = build_model(tokenizer)
    original = {n: p.clone() for n, p in base.state_dict().items()}
    policy = hf_lm.add_lora(base, cfg.lora_rank, cfg.lora_alpha)
    metrics, _ = train_dpo(policy, Reference(policy), tokenizer, train, val[:8], cfg, 0)
    assert metrics["val_loss_before"] == pytest.approx(0.6931, abs=1e-4)  # fresh adapter: policy == reference
    assert metrics["val_rewards_margins_after"] != 0.0 and metrics["steps"] == 8
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with policy.disable_adapter():  # the reference: the untouched base weights
        untouched = build_model(tokenizer)
        untouched.load_state_dict(original)
        ids = torch.tensor([hf_lm.chat_ids(tokenizer, val[0]["prompt"] + val[0]["chosen"])])
        assert torch.allclose(policy(input_ids=ids).logits, untouched(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(policy(input_ids=ids).logits, untouched(input_ids=ids).logits, atol=1e-4)


def test_planted_preference_is_learned(tokenizer, docs):
    # Chosen: the real next sentence; rejected: its words shuffled. A tiny random model learns the order.
    train, val = split(build_pairs(docs[:600], 5, by_hash(5, 0.2), "shuffled", 320))
    cfg = AlignConfig(max_steps=25, batch_size=4, learning_rate=5e-3, warmup_steps=2, max_length=128)
    model = build_model(tokenizer)
    m, _ = train_dpo(model, Reference(model, build_model(tokenizer)), tokenizer, train, val[:32], cfg, 0)
    assert m["val_rewards_accuracies_before"] == 0.0 and m["val_rewards_margins_before"] == 0.0  # policy == reference
    assert m["val_rewards_accuracies_after"] >= 0.75 and m["val_rewards_margins_after"] > 0.2
    assert m["val_loss_after"] < m["val_loss_before"]


def stage_inputs(run_dir, configs, tokenizer, docs):
    write_corpus_upstream(run_dir, configs, docs[:400])
    save_hf(run_dir / "sft" / "hf", build_model(tokenizer, positions=64), tokenizer)  # as smoke's micro
    write_upstream(run_dir, configs, "sft", {"hf": "hf"})


def test_align_stage_through_the_runner(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["align.learning_rate=1e-3", "align.rm_steps=20", "align.judge_prompts=8"])
    stage_inputs(run_dir, configs, tokenizer, docs)

    manifest = execute_stage(str(run_dir), "align", configs_to_json(configs))

    out = run_dir / "align"
    assert set(manifest["outputs"]) == {"hf", "pairs", "reward_model", "train_log"}
    m = manifest["metrics"]
    assert m["method"] == "dpo" and m["rm_steps"] == 20 and 0.0 <= m["rm_val_accuracy"] <= 1.0
    assert m["judge_prompts"] == min(8, m["val_pairs"]) and 0.0 <= m["win_rate_vs_sft"] <= 1.0
    assert m["kl_from_reference"] != 0.0 and m["max_new_tokens"] == 16  # a quarter of the micro model's 64 positions
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model", dtype=torch.float32)
    assert reward_model.config.num_labels == 1 and (out / "reward_model" / "model.safetensors").is_file()
    assert m["steps"] == 5 and m["train_pairs"] == 32 and m["val_pairs"] > 0
    assert m["val_rewards_accuracies_before"] == 0.0 and m["val_loss_before"] == pytest.approx(0.6931, abs=1e-4)
    assert m["val_rewards_margins_after"] != 0.0
    json.dumps(m)
    pairs = read_pairs(out / "pairs.jsonl")
    assert sum(p["split"] == "train" for p in pairs) == 32
    assert m["max_length"] == 64 and m["dropped_prompt_too_long"] > 0
    assert all(len(hf_lm.chat_ids(tokenizer, p["prompt"], add_generation_prompt=True)) <= 48 for p in pairs)
    assert not (out / "checkpoints").exists()  # deleted once hf/ is saved

    aligned = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "hf", dtype=torch.float32)
    changed = [n for n, p in aligned.state_dict().items() if not torch.equal(p, sft.state_dict()[n])]
    assert changed  # DPO trained the policy
    assert (out / "hf" / "tokenizer_config.json").is_file()


def test_lora_dpo_on_user_pairs_through_the_runner(tmp_path, tokenizer, docs):
    pairs = build_pairs(docs[:400], 7, by_hash(7, 0.2), "shuffled", 96)
    user_file = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
          "rejected": p["rejected"][0]["content"]} for p in pairs],  # text form, no ids or splits
    )
    run_dir = tmp_path / "run"
    overrides = ["align.lora=true", f"align.pairs_files={user_file}", "align.rm_steps=5", "align.judge_prompts=4",
                 "align.learning_rate=1e-3"]
    configs = resolve_configs("smoke", overrides)
    stage_inputs(run_dir, configs, tokenizer, docs)

    manifest = execute_stage(str(run_dir), "align", configs_to_json(configs))

    out, m = run_dir / "align", manifest["metrics"]
    assert set(manifest["outputs"]) == {"hf", "pairs", "reward_model", "adapter", "train_log"}
    assert m["lora"] and m["pairs_built"] == len(pairs) and m["val_loss_before"] == pytest.approx(0.6931, abs=1e-4)
    used = read_pairs(out / "pairs.jsonl")
    assert {p["chosen"][0]["content"] for p in used} <= {p["chosen"][0]["content"] for p in pairs}
    assert all(p["id"].startswith("prefs-") for p in used)
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    assert not any("lora" in n for n in merged.state_dict())  # a plain Llama checkpoint, adapter merged


def test_align_fails_clearly_for_unknown_methods(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["align.method=rloo"])
    stage_inputs(run_dir, configs, tokenizer, docs)
    with pytest.raises(ValueError, match=r"align.method='rloo' is not implemented; available: dpo, ppo, grpo, steerlm"):
        execute_stage(str(run_dir), "align", configs_to_json(configs))
