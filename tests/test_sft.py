"""The sft stage: instruction data (both shapes, rejects), assistant-only labels, packing, recipes,
LoRA/DoRA adapter save/reload and merge, full SFT, the stage run."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from curation.corpus import read_corpus
from curation.split import by_hash, decide_split, write_split
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from pipeline.stage import StageContext
from recipes import hf_lm
from recipes.instructions import (
    build_instructions,
    check_rejects,
    read_instructions,
    read_user_instructions,
    write_jsonl,
)
from recipes.sft import add_lora, fine_tune, load_records
from recipes.sft_recipes import RECIPES, resolve_config
from recipes.stages import SFTConfig
from tiny_lm import build_model, doc_paragraphs, save_hf, write_corpus_upstream, write_upstream

torch.set_num_threads(1)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does the for statement do?"},
    {"role": "assistant", "content": "It iterates over a sequence."},
    {"role": "user", "content": "And break?"},
    {"role": "assistant", "content": "It ends the loop."},
]


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
    records = build_instructions(docs[:80], seed=7, split_of=by_hash(7, 0.2), chat_chars=320)
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
    a = build_instructions(docs, seed=1, split_of=by_hash(1, 0.1), chat_chars=320)
    assert a == build_instructions(docs, seed=1, split_of=by_hash(1, 0.1), chat_chars=320)
    assert a != build_instructions(docs, seed=2, split_of=by_hash(2, 0.1), chat_chars=320)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    split = {r["id"]: r["split"] for r in a}
    again = build_instructions(shuffled, seed=1, split_of=by_hash(1, 0.1), chat_chars=320)
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
    (tmp_path / "shard-00000.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"shard-00000.jsonl:2: corpus record needs"):
        read_corpus(tmp_path)


def test_sft_builds_the_same_instructions_from_a_parquet_corpus_as_from_jsonl(tmp_path):
    """curate.output_format=parquet: the sft stage's corpus reader finds the shards and reads the same records."""
    import pandas as pd

    from curation.curate import write_shards

    docs = pd.DataFrame([{**d, "source": f"topics:{i}"} for i, d in enumerate(doc_paragraphs()[:40])])
    cfg = SFTConfig()
    built = {}
    for fmt in ("jsonl", "parquet"):
        write_shards(tmp_path / fmt / "curate" / "corpus", docs, docs_per_shard=15, output_format=fmt)
        (tmp_path / fmt / "tokenize").mkdir()
        write_split(tmp_path / fmt / "tokenize" / "split.json", decide_split(docs.to_dict("records"), 3, 0.1))
        ctx = StageContext(name="sft", config=cfg, run_dir=tmp_path / fmt, out_dir=tmp_path / fmt / "sft.tmp",
                           inputs={"curate": {"outputs": {"corpus": {"path": "corpus"}}},
                                   "tokenize": {"outputs": {"split": {"path": "split.json"}}}}, seed=3)
        built[fmt] = load_records(ctx, cfg, max_length=256)

    records, counts = built["parquet"]
    assert len(records) > 10 and counts == {"records_read": len(records), "rejects": 0}
    assert built["parquet"] == built["jsonl"]


def tuned_adapter(base_dir, examples, pad_id, **overrides):
    """Return (base logits, adapted logits, the trained PeftModel, the batch) after a few steps of LoRA/DoRA."""
    cfg = resolve_config(SFTConfig(max_steps=8, batch_size=4, learning_rate=2e-2, warmup_steps=1, eval_every=0,
                                   lora_dropout=0.1, **overrides))
    base, _ = hf_lm.load_causal_lm(base_dir)
    batch = hf_lm.pad_batch(examples[:3], pad_id)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.manual_seed(0)
    model = add_lora(base, cfg)
    rows = hf_lm.pack_examples(examples, 128, packing=False)
    log = fine_tune(model, rows, rows[:4], pad_id, cfg, seed=0)
    assert len(log["train"]) == 8 and not model.training
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter changed the model
    return adapted, model, batch


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_reloads_in_peft_and_merges_into_base(tokenizer, docs, base_dir, tmp_path, use_dora):
    records = build_instructions(docs[:60], 3, by_hash(3, 0.0), 320)
    examples = [hf_lm.encode_chat(tokenizer, r["messages"], 128) for r in records]
    adapted, model, batch = tuned_adapter(base_dir, examples, tokenizer.pad_token_id, use_dora=use_dora)

    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is use_dora and config["r"] == RECIPES["tiny"]["lora_rank"]
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
    write_corpus_upstream(run_dir, configs, docs[:400])
    save_hf(run_dir / "pretrain" / "hf", build_model(tokenizer, positions=64), tokenizer)  # as smoke's micro
    write_upstream(run_dir, configs, "pretrain", {"hf": "hf"})

    manifest = execute_stage(str(run_dir), "sft", configs_to_json(configs))

    out = run_dir / "sft"
    assert set(manifest["outputs"]) == {"hf", "adapter", "instructions", "rejects", "loss_curve", "config", "train_log"}
    assert not (out / "checkpoints").exists()  # deleted once hf/ is saved
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 21)) and "val_loss" in steps[-1]
    m = manifest["metrics"]
    ran = json.loads((out / "sft_config.json").read_text())
    assert ran["max_steps"] == 20 and ran["lora_rank"] == RECIPES["tiny"]["lora_rank"]  # override, recipe
    assert manifest["config"]["lora_rank"] is None  # the manifest keeps what was asked
    assert m["recipe"] == "tiny" and m["mode"] == "lora" and m["rejects"] == 0
    assert (out / "rejects" / "rejects.jsonl").read_text() == ""
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


def test_recipe_fills_only_unset_fields_and_cli_overrides_win():
    tiny = resolve_config(SFTConfig())
    assert all(getattr(tiny, k) == (tuple(v) if isinstance(v, tuple) else v) for k, v in RECIPES["tiny"].items())
    configs = resolve_configs("tiny", ["sft.recipe=llama3_8b_lora", "sft.lora_rank=64", "sft.max_steps=3"])
    cfg = resolve_config(configs["sft"])
    assert (cfg.lora_rank, cfg.max_steps) == (64, 3)  # set on the command line
    assert (cfg.learning_rate, cfg.max_length, cfg.bf16, cfg.packing) == (1e-4, 4096, True, True)  # the recipe's
    full = resolve_config(resolve_configs("tiny", ["sft.recipe=llama3_8b_full"])["sft"])
    assert full.mode == "full" and full.gradient_checkpointing and full.learning_rate < cfg.learning_rate
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    assert all(set(r) <= fields for r in RECIPES.values())
    assert all(None not in r.values() for r in RECIPES.values())
    with pytest.raises(ValueError, match="unknown sft.recipe"):
        resolve_config(SFTConfig(recipe="llama9"))
    with pytest.raises(ValueError, match="sft.mode"):
        resolve_config(SFTConfig(mode="qlora"))


def segment_nll(logits: torch.Tensor, row: dict) -> list[float]:
    """Return the summed NLL of each example packed in `row` (examples start where position_ids restart)."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (T, V)
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    sums = []
    for a, b in zip(starts, starts[1:]):
        sums.append(-sum(logp[t - 1, row["input_ids"][t]].item() for t in range(a + 1, b) if row["labels"][t] != -100))
    return sums


def test_packed_rows_give_each_example_the_loss_it_has_alone(tokenizer, docs, base_dir):
    model, _ = hf_lm.load_causal_lm(base_dir)
    for p in model.parameters():  # sharper attention than the 0.02 init, so leaks between examples would show
        p.data.mul_(3.0)
    records = build_instructions(docs[:30], seed=5, split_of=by_hash(5, 0.0), chat_chars=320)
    examples = [hf_lm.encode_chat(tokenizer, r["messages"], 256) for r in records[:7]]
    rows = hf_lm.pack_examples(examples, 512, packing=True)
    assert len(rows) < len(examples) and max(len(r["input_ids"]) for r in rows) <= 512
    assert [p for r in rows for p in r["position_ids"]] == [p for e in examples for p in range(len(e["input_ids"]))]
    alone = [segment_nll(model(input_ids=torch.tensor([e["input_ids"]])).logits[0], r)[0]
             for e, r in zip(examples, hf_lm.pack_examples(examples, 512, packing=False))]
    assert min(alone) > 1.0  # every example has answer tokens

    batch = hf_lm.collate_rows(rows, tokenizer.pad_token_id)  # (B, T), the shorter row padded
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed = [s for i, r in enumerate(rows) for s in segment_nll(logits[i, : len(r["input_ids"])], r)]
        total, count = hf_lm.forward_nll(model, batch)
        # the same rows with positions running on: examples see each other
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).repeat(len(rows), 1))
        leaked = model(input_ids=leaky["input_ids"], position_ids=leaky["position_ids"], use_cache=False).logits
    assert packed == pytest.approx(alone, rel=1e-5)
    assert total.item() == pytest.approx(sum(alone), rel=1e-5)
    assert count == sum(sum(lab != -100 for lab in e["labels"][1:]) for e in examples)
    leaked_sums = [s for i, r in enumerate(rows) for s in segment_nll(leaked[i, : len(r["input_ids"])], r)]
    assert max(abs(a - b) for a, b in zip(leaked_sums[1:], alone[1:])) > 1.0


ALPACA = {"instruction": "Name the loop statement.", "input": "Python", "output": "for"}


def test_both_instruction_shapes_are_read_and_bad_records_rejected_with_line_numbers(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": CHAT}) + "\n\n"  # a blank line is skipped, not a reject
        + json.dumps({"id": "x", "split": "val", "messages": CHAT[1:3]}) + "\n"
        + "{broken\n"
        + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n"
    )
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_bytes(
        (json.dumps(ALPACA) + "\n" + json.dumps(dict(ALPACA, input="", system="Be brief.")) + "\n").encode()
        + b"\xff\xfe not utf-8\n"
        + (json.dumps({"instruction": "no output"}) + "\n" + json.dumps({"prompt": "?"}) + "\n").encode()
    )
    records, rejects, lines = read_user_instructions([str(chat), str(alpaca)], seed=1, heldout_fraction=0.0)
    assert lines == 9 and len(records) == 4 and len(rejects) == 5
    assert records[0] == {"id": "chat-1", "split": "train", "messages": CHAT}
    assert records[1]["id"] == "x" and records[1]["split"] == "val"
    assert records[2]["messages"] == [
        {"role": "user", "content": "Name the loop statement.\n\nPython"},
        {"role": "assistant", "content": "for"},
    ]
    assert records[3]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert records[3]["messages"][1]["content"] == "Name the loop statement."
    got = [(Path(r["file"]).name, r["line"], r["reason"]) for r in rejects]
    assert got == [
        ("chat.jsonl", 4, "not_json"),
        ("chat.jsonl", 5, "invalid_record"),
        ("alpaca.jsonl", 3, "not_utf8"),
        ("alpaca.jsonl", 4, "invalid_record"),
        ("alpaca.jsonl", 5, "invalid_record"),
    ]
    assert f"{chat}:5: the last message must be the assistant" in rejects[1]["detail"]
    assert "'output' must be a non-empty string" in rejects[3]["detail"]
    assert "expected 'messages' (chat) or 'instruction' and 'output'" in rejects[4]["detail"]
    assert rejects[0]["raw"] == "{broken"
    # the split of a record without one is a seeded hash of its id
    assert read_user_instructions([str(chat)], seed=1, heldout_fraction=1.0)[0][0]["split"] == "val"

    check_rejects(rejects, lines, 0.6, tmp_path / "rejects.jsonl")  # 5 of 9 is under 60 %
    with pytest.raises(ValueError, match=r"5 of 9 instruction records .* sft.max_rejects_fraction=0.5") as err:
        check_rejects(rejects, lines, 0.5, tmp_path / "rejects.jsonl")
    assert f"{chat}:4: not JSON" in str(err.value)


def test_full_sft_on_user_files_with_packing_through_the_runner(tmp_path, tokenizer, docs):
    """Full fine-tuning of every weight on a user's Alpaca-shaped file with a malformed line, packed rows."""
    records = build_instructions(docs[:200], seed=4, split_of=by_hash(4, 0.0), chat_chars=60)
    data = tmp_path / "mine.jsonl"
    lines = [json.dumps({"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]})
             for r in records[:120]]
    lines.insert(7, '{"instruction": "cut off"')
    data.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["sft.mode=full", f"sft.data_files={data}", "sft.packing=true",
                                        "sft.max_steps=12", "sft.learning_rate=3e-3", "sft.batch_size=2",
                                        "sft.grad_accum_steps=2", "sft.heldout_fraction=0.2"])
    write_corpus_upstream(run_dir, configs, docs[:10])
    save_hf(run_dir / "pretrain" / "hf", build_model(tokenizer, positions=128), tokenizer)
    write_upstream(run_dir, configs, "pretrain", {"hf": "hf"})

    manifest = execute_stage(str(run_dir), "sft", configs_to_json(configs))

    out, m = run_dir / "sft", manifest["metrics"]
    assert "adapter" not in manifest["outputs"] and not (out / "adapter").exists()
    assert m["mode"] == "full" and m["trainable_fraction"] == 1.0 and m["packing"]
    assert m["records_read"] == len(lines) and m["rejects"] == 1
    (reject,) = [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 8 and reject["reason"] == "not_json" and reject["file"] == str(data)
    assert m["max_length"] == 128 and m["train_examples"] == 64  # smoke: max_examples=64
    assert m["train_rows"] < 64 / 2 and m["row_fill"] > 0.6  # several chats per 128-token row
    assert m["val_loss_after"] < m["val_loss_before"]
    tuned, _ = hf_lm.load_causal_lm(out / "hf")
    base, _ = hf_lm.load_causal_lm(run_dir / "pretrain" / "hf")
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.parameters()))  # every weight was trained
