"""The sft stage: instruction data, assistant-only labels, LoRA adapter save/reload, merge, the stage run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm
from recipes.instructions import (
    build_instructions,
    read_corpus,
    read_instructions,
    write_jsonl,
)
from recipes.sft import add_lora, train_lora
from recipes.stages import SFTConfig
from tiny_lm import build_model, build_tokenizer, doc_paragraphs, save_hf, write_corpus, write_upstream

torch.set_num_threads(1)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does the for statement do?"},
    {"role": "assistant", "content": "It iterates over a sequence."},
    {"role": "user", "content": "And break?"},
    {"role": "assistant", "content": "It ends the loop."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def docs():
    return doc_paragraphs()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    return save_hf(tmp_path_factory.mktemp("pretrain") / "hf", build_model(tokenizer), tokenizer)


def test_labels_cover_assistant_turns_only(tokenizer):
    enc = hf_lm.encode_chat(tokenizer, CHAT, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"])
    labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != hf_lm.IGNORE]
    assert all(lab in (hf_lm.IGNORE, t) for t, lab in zip(enc["input_ids"], enc["labels"]))
    assert tokenizer.decode(labelled) == "It iterates over a sequence.</s>\nIt ends the loop.</s>\n"
    unlabelled = tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == hf_lm.IGNORE])
    for m in CHAT:
        assert (m["content"] in unlabelled) == (m["role"] != "assistant")


def test_truncation_keeps_the_start(tokenizer):
    full = hf_lm.encode_chat(tokenizer, CHAT, max_length=512)
    cut = hf_lm.encode_chat(tokenizer, CHAT, max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_chat_template_round_trip(tokenizer, docs, tmp_path):
    records = build_instructions(docs[:80], seed=7, heldout_fraction=0.2, chat_chars=320)
    path = write_jsonl(tmp_path / "instructions.jsonl", records)
    assert read_instructions(path) == records
    user, answer = records[0]["messages"]
    rendered = tokenizer.apply_chat_template(records[0]["messages"], tokenize=False)
    assert rendered == f"<|user|>\n{user['content']}</s>\n<|assistant|>\n{answer['content']}</s>\n"
    enc = hf_lm.encode_chat(tokenizer, records[0]["messages"], max_length=1024)
    assert tokenizer.decode(enc["input_ids"]) == rendered
    prompt = hf_lm.chat_ids(tokenizer, records[0]["messages"][:1], add_generation_prompt=True)
    assert enc["input_ids"][: len(prompt)] == prompt
    assert set(enc["labels"][: len(prompt)]) == {hf_lm.IGNORE} and hf_lm.IGNORE not in enc["labels"][len(prompt) :]


def test_instructions_are_seeded_and_split_by_document(docs):
    a = build_instructions(docs, seed=1, heldout_fraction=0.1, chat_chars=320)
    assert a == build_instructions(docs, seed=1, heldout_fraction=0.1, chat_chars=320)
    assert a != build_instructions(docs, seed=2, heldout_fraction=0.1, chat_chars=320)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    split = {r["id"]: r["split"] for r in a}
    again = build_instructions(shuffled, seed=1, heldout_fraction=0.1, chat_chars=320)
    assert split == {r["id"]: r["split"] for r in again}
    val = sum(s == "val" for s in split.values())
    assert 0.05 * len(a) < val < 0.15 * len(a)
    for r in a[:50]:
        context = r["messages"][0]["content"].split("\n", 1)[1]
        assert context and r["messages"][1]["content"] and r["messages"][1]["content"] not in context


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not JSON"),
        (json.dumps({"id": "a", "split": "train"}), "'messages' must be a non-empty list"),
        (json.dumps({"id": "a", "split": "test", "messages": []}), "'split' must be one of"),
        (json.dumps({"id": 3, "split": "train", "messages": []}), "'id' must be a string"),
        (
            json.dumps({"id": "a", "split": "train", "messages": [{"role": "user", "content": "hi"}]}),
            "last message must be the assistant",
        ),
        (
            json.dumps({"id": "a", "split": "train", "messages": [{"role": "bot", "content": "hi"}]}),
            "needs a 'role'",
        ),
        (
            json.dumps(
                {
                    "id": "a",
                    "split": "train",
                    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}],
                }
            ),
            "non-empty string 'content'",
        ),
        (
            json.dumps({"id": "a", "split": "train", "messages": [{"role": "assistant", "content": "hi"}]}),
            "opens with an assistant turn",
        ),
    ],
)
def test_malformed_instruction_records_are_rejected(tmp_path, line, message):
    good = {"id": "ok", "split": "train", "messages": CHAT}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_instructions(path)
    assert f"{path}:2" in str(err.value)


def test_malformed_corpus_record_is_named(tmp_path):
    (tmp_path / "part-0.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"part-0.jsonl:2: corpus record needs"):
        read_corpus(tmp_path)


def test_adapter_reloads_in_peft_and_merges_into_base(tokenizer, docs, base_dir, tmp_path):
    cfg = SFTConfig(max_steps=8, batch_size=4, learning_rate=2e-2, warmup_steps=1, lora_dropout=0.1)
    examples = [hf_lm.encode_chat(tokenizer, r["messages"], 128) for r in build_instructions(docs[:60], 3, 0.0, 320)]
    base, _ = hf_lm.load_causal_lm(base_dir)
    batch = hf_lm.pad_batch(examples[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    torch.manual_seed(0)
    model = add_lora(base, cfg)
    losses = train_lora(model, examples, tokenizer.pad_token_id, cfg, seed=0)
    assert len(losses) == 8 and not model.training
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter changed the model

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh_base, _ = hf_lm.load_causal_lm(base_dir)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, adapted, atol=1e-6, rtol=0)

    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (merged_logits - adapted).abs().max() <= 1e-5


def test_sft_stage_through_the_runner(tmp_path, tokenizer, docs):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["sft.max_steps=20", "sft.learning_rate=1e-2"])
    write_corpus(run_dir / "curate" / "corpus", docs[:400])
    write_upstream(run_dir, configs, "curate", {"corpus": "corpus"})
    save_hf(run_dir / "pretrain" / "hf", build_model(tokenizer, positions=64), tokenizer)  # as smoke's micro
    write_upstream(run_dir, configs, "pretrain", {"hf": "hf"})

    manifest = execute_stage(str(run_dir), "sft", configs_to_json(configs))

    out = run_dir / "sft"
    assert set(manifest["outputs"]) == {"hf", "adapter", "instructions"}
    m = manifest["metrics"]
    assert m["steps"] == 20 and m["train_examples"] == 64 and m["val_examples"] > 0
    assert m["val_loss_after"] < m["val_loss_before"]
    assert 0 < m["trainable_fraction"] < 0.5
    records = read_instructions(out / "instructions.jsonl")
    assert sum(r["split"] == "train" for r in records) == 64
    assert m["max_length"] == 64 and m["dropped_prompt_too_long"] > 0
    assert all(len(hf_lm.chat_ids(tokenizer, r["messages"][:1], add_generation_prompt=True)) <= 48 for r in records)

    # Peer readers: peft reads the adapter onto the pretrain weights; it equals the merged hf/ checkpoint.
    base, _ = hf_lm.load_causal_lm(run_dir / "pretrain" / "hf")
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged, merged_tok = hf_lm.load_causal_lm(out / "hf")
    assert merged_tok.chat_template == tokenizer.chat_template
    batch = hf_lm.pad_batch(
        [hf_lm.encode_chat(merged_tok, r["messages"], 64) for r in records[:2]], merged_tok.pad_token_id
    )
    with torch.no_grad():
        a = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (a - b).abs().max() <= 1e-5
