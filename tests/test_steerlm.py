"""SteerLM: rule-based attribute labels, the conditioned prompt and loss mask, an attribute model and a
conditioned SFT that learn planted attributes, requested verbosity moving the measured length, the stage run."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignment import steerlm
from alignment.reward_model import LoopSettings, load_scoring_model
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm
from test_align import stage_inputs
from tiny_lm import build_model, save_hf

torch.set_num_threads(1)
REPEATS = (1, 3, 6, 9, 12)  # planted answers: "yes" this many times, one length per verbosity level


def planted(docs, seed: int) -> list[dict]:
    """Items whose answer is "yes" repeated REPEATS[k] times, each k as often, in a seeded order; helpfulness 4."""
    repeats = [REPEATS[i % len(REPEATS)] for i in range(len(docs))]
    random.Random(seed).shuffle(repeats)
    return [
        {"prompt": [{"role": "user", "content": d["text"][:60]}], "answer": " ".join(["yes"] * n), "helpfulness": 4}
        for d, n in zip(docs, repeats)
    ]


def test_rule_labels_by_hand():
    pair = {
        "prompt": [{"role": "user", "content": "Continue: a b"}],
        "chosen": [{"role": "assistant", "content": "one two three four five six seven eight"}],
        "rejected": [{"role": "assistant", "content": "eight seven six five four three two one"}],
    }
    items = steerlm.labelled_answers([pair])
    assert [(i["answer"], i["helpfulness"]) for i in items] == [
        ("one two three four five six seven eight", 4),
        ("one two", 4),  # its first quarter
        ("one two three four", 4),  # its first half
        ("eight seven six five four three two one", 0),
    ]
    edges = steerlm.verbosity_edges([" ".join(["w"] * n) for n in range(1, 11)])
    assert edges == [2.8, 4.6, 6.4, 8.2]
    assert [steerlm.verbosity_level(" ".join(["w"] * n), edges) for n in (1, 3, 5, 7, 9, 30)] == [0, 1, 2, 3, 4, 4]
    assert [i["verbosity"] for i in steerlm.with_verbosity(items, edges)] == [3, 0, 1, 3]


def test_attributes_are_requested_right_before_the_answer_and_not_trained_on(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    steered = steerlm.attribute_prompt(prompt, helpfulness=4, verbosity=1)
    assert steered[0] == prompt[0] and steered[1]["content"] == "Name a colour.\n<attr> helpfulness:4 verbosity:1"
    item = {"prompt": prompt, "answer": "Blue.", "helpfulness": 4, "verbosity": 1}
    (example,) = steerlm.conditioned_examples(tokenizer, [item], [{"helpfulness": 0, "verbosity": 3}], 128)
    trained = tokenizer.decode([t for t in example["labels"] if t != hf_lm.IGNORE])
    assert trained.startswith("Blue.") and "<attr>" in tokenizer.decode(example["input_ids"])
    assert "verbosity:3" in tokenizer.decode(example["input_ids"])  # the given labels, not the item's


def test_attribute_model_learns_planted_verbosity(tokenizer, docs, tmp_path):
    items = planted(docs[:300], 0)
    edges = steerlm.verbosity_edges([i["answer"] for i in items])
    train, val = steerlm.with_verbosity(items[:260], edges), steerlm.with_verbosity(items[260:], edges)
    save_hf(tmp_path / "sft", build_model(tokenizer, seed=2), tokenizer)
    model = load_scoring_model(tmp_path / "sft", num_labels=2)
    before = steerlm.attribute_accuracy(steerlm.predict_attributes(model, tokenizer, val, 128, 16), val)
    losses = steerlm.train_attribute_model(model, tokenizer, train, 128, LoopSettings(80, 8, 3e-3, 0))
    after = steerlm.attribute_accuracy(steerlm.predict_attributes(model, tokenizer, val, 128, 16), val)
    assert losses[-1] < losses[0]
    assert after["verbosity_mae"] < 0.6 < before["verbosity_mae"]
    assert after["helpfulness_accuracy"] == 1.0  # every planted answer is helpful (4)


def test_requested_verbosity_moves_the_measured_length(tokenizer, docs):
    items = planted(docs[:400], 1)
    edges = steerlm.verbosity_edges([i["answer"] for i in items])
    assert [steerlm.verbosity_level(" ".join(["yes"] * n), edges) for n in REPEATS] == [0, 1, 2, 3, 4]
    items = steerlm.with_verbosity(items, edges)
    labels = [{a: i[a] for a in steerlm.ATTRIBUTES} for i in items]
    model = build_model(tokenizer)
    examples = steerlm.conditioned_examples(tokenizer, items, labels, 128)
    held_out = [i["prompt"] for i in planted(docs[400:416], 2)]
    before = steerlm.steered_word_counts(model, tokenizer, held_out, helpfulness=4, max_new_tokens=40)
    steerlm.train_conditioned(model, examples, tokenizer.pad_token_id, LoopSettings(100, 8, 1e-2, 0))
    after = steerlm.steered_word_counts(model, tokenizer, held_out, helpfulness=4, max_new_tokens=40)
    assert abs(before[4] - before[0]) < 2  # an untrained model ignores the request
    assert after[0] < after[1] < min(after[2:]) and after[4] - after[0] >= 6


def test_steerlm_through_the_runner(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    overrides = ["align.method=steerlm", "align.rm_steps=5", "align.attribute_steps=5", "align.steer_steps=10",
                 "align.judge_prompts=4", "align.steer_labels=model"]
    configs = resolve_configs("smoke", overrides)
    stage_inputs(run_dir, configs, tokenizer, docs)

    manifest = execute_stage(str(run_dir), "align", configs_to_json(configs))

    out, m = run_dir / "align", manifest["metrics"]
    assert set(manifest["outputs"]) == {"hf", "pairs", "reward_model", "attribute_model", "train_log"}
    assert m["method"] == "steerlm" and m["steps"] == 10 and m["steer_labels"] == "model"
    assert len(m["steer_words_by_verbosity"]) == 5 and len(m["verbosity_edges_words"]) == 4
    assert 0.0 <= m["attribute_val_verbosity_accuracy"] <= 1.0 and "win_rate_vs_sft" in m
    attribute_model = AutoModelForSequenceClassification.from_pretrained(out / "attribute_model")
    assert attribute_model.config.num_labels == 2


def test_bad_steer_settings_fail_clearly(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["align.method=steerlm", "align.steer_verbosity=7"])
    stage_inputs(run_dir, configs, tokenizer, docs)
    with pytest.raises(ValueError, match="steer_verbosity must be an attribute level 0..4"):
        execute_stage(str(run_dir), "align", configs_to_json(configs))
