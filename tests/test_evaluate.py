"""The evaluate stage: perplexity against a hand computation, greedy KV-cache sampling, the stage run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm
from tiny_lm import build_model, build_tokenizer, doc_paragraphs, save_hf, write_upstream

torch.set_num_threads(1)

TEXTS = [
    "The for statement is used to iterate over the elements of a sequence.",
    "Names in the target list are not deleted when the loop is finished.",
    "A break statement executed in the first suite terminates the loop without executing the else clause.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer, seed=3)


def test_perplexity_is_exp_of_mean_token_nll_by_hand(model, tokenizer):
    encoded = [hf_lm.encode_document(tokenizer, t, 512) for t in TEXTS]
    assert len({len(e["input_ids"]) for e in encoded}) == 3  # batches of 2 need padding
    nll, tokens = hf_lm.mean_nll(model, encoded, tokenizer.pad_token_id, batch_size=2)

    total, count = 0.0, 0
    for text in TEXTS:
        eos = tokenizer.eos_token_id
        ids = [eos] + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)  # (T, V)
        for t in range(1, len(ids)):
            total -= logp[t - 1, ids[t]].item()
            count += 1
    assert tokens == count
    assert hf_lm.perplexity(nll) == pytest.approx(math.exp(total / count), rel=1e-5)

    # A peer reader: transformers' own causal-LM loss on one unpadded document is the same mean NLL.
    one = encoded[2]
    with torch.no_grad():
        hf_loss = model(input_ids=torch.tensor([one["input_ids"]]), labels=torch.tensor([one["labels"]])).loss.item()
    assert hf_lm.mean_nll(model, [one], tokenizer.pad_token_id, batch_size=1)[0] == pytest.approx(hf_loss, rel=1e-5)


def test_max_batches_caps_the_documents_scored(model, tokenizer):
    encoded = [hf_lm.encode_document(tokenizer, t, 512) for t in TEXTS]
    _, capped = hf_lm.mean_nll(model, encoded, tokenizer.pad_token_id, batch_size=2, max_batches=1)
    assert capped == sum(len(e["input_ids"]) - 1 for e in encoded[:2])


def test_greedy_reply_equals_a_greedy_loop_without_cache(model, tokenizer):
    prompt = "Continue this text:\nThe for statement"
    reply = hf_lm.greedy_reply(model, tokenizer, prompt, max_new_tokens=12)

    ids = hf_lm.chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    new = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    assert reply == tokenizer.decode(new, skip_special_tokens=True)
    assert reply  # a random model rarely says eos first; an empty reply would make this check vacuous


def test_evaluate_stage_through_the_runner(tmp_path, tokenizer):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke")
    (run_dir / "tokenize").mkdir(parents=True)
    heldout = doc_paragraphs()[:40]
    with open(run_dir / "tokenize" / "heldout.jsonl", "w") as f:
        for d in heldout:
            f.write(json.dumps(d) + "\n")
    write_upstream(run_dir, configs, "tokenize", {"heldout": "heldout.jsonl"})
    for seed, name in enumerate(("pretrain", "sft", "align")):
        save_hf(run_dir / name / "hf", build_model(tokenizer, seed=seed), tokenizer)
        write_upstream(run_dir, configs, name, {"hf": "hf"})

    manifest = execute_stage(str(run_dir), "evaluate", configs_to_json(configs))

    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert set(report["models"]) == {"pretrain", "sft", "align"}
    assert report["heldout"]["documents"] == 40
    batch = configs["evaluate"].batch_size
    scored = [hf_lm.encode_document(tokenizer, d["text"], 256) for d in heldout[: 2 * batch]]  # smoke: 2 batches
    expected_tokens = sum(len(e["input_ids"]) - 1 for e in scored)
    ppls = set()
    for name, result in report["models"].items():
        assert result["tokens"] == expected_tokens
        assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
        assert manifest["metrics"][f"{name}_ppl"] == round(result["perplexity"], 3)
        assert [s["prompt"] for s in result["samples"]] == list(configs["evaluate"].prompts)
        ppls.add(result["perplexity"])
    assert len(ppls) == 3  # three different models were scored
    sft, sft_tok = hf_lm.load_causal_lm(run_dir / "sft" / "hf")
    first = report["models"]["sft"]["samples"][0]
    assert first["reply"] == hf_lm.greedy_reply(sft, sft_tok, first["prompt"], max_new_tokens=8)
