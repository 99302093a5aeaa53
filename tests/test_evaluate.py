"""The evaluate stage: perplexity against a hand computation, greedy KV-cache sampling, prompting accuracy
(shared-prompt scoring against separate sequences, a planted task), the stage run, lm-evaluation-harness's shipped
tasks against our scoring."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from curation.split import by_hash
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from recipes import hf_lm, lm_harness, prompt_eval
from recipes.instructions import build_instructions, split_sentences, write_jsonl
from tiny_lm import build_model, doc_paragraphs, save_hf, write_upstream

torch.set_num_threads(1)

TEXTS = [
    "The for statement is used to iterate over the elements of a sequence.",
    "Names in the target list are not deleted when the loop is finished.",
    "A break statement executed in the first suite terminates the loop without executing the else clause.",
]


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


def test_items_offer_the_true_next_sentence_among_other_documents():
    docs = doc_paragraphs()[:60]
    items = prompt_eval.build_items(docs, seed=3, max_items=24)
    assert len(items) == 24 and items == prompt_eval.build_items(docs, seed=3, max_items=24)
    assert len({it["answer"] for it in items}) > 2  # the true option moves around
    text = {d["id"]: " ".join(split_sentences(d["text"])) for d in docs}
    for it in items:
        doc = it["id"].rsplit("@", 1)[0]
        assert len(it["options"]) == prompt_eval.CHOICES == len(set(it["options"]))
        assert (it["context"] + " " + it["options"][it["answer"]]) in text[doc]
        for k, option in enumerate(it["options"]):
            if k != it["answer"]:
                assert option not in text[doc] and any(option in t for t in text.values())


def test_shared_prompt_scores_equal_separate_sequences(model, tokenizer):
    items = prompt_eval.build_items(doc_paragraphs()[:40], seed=1, max_items=5)
    prompts, options = [], []
    for i, it in enumerate(items):
        prompt = prompt_eval.render(it, "few_shot", prompt_eval.pick_shots(items, i, 2, seed=0))
        p, o = prompt_eval.encode_choices(tokenizer, prompt, it["options"], 512)
        prompts.append(p)
        options.append(o)
    fast = hf_lm.choice_logprobs(model, prompts, options, tokenizer.pad_token_id, batch_size=2)
    for p, opts, scores in zip(prompts, options, fast):
        for o, score in zip(opts, scores):
            # peer: transformers' own loss over the option tokens of prompt + option as one sequence
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([p + o]), labels=torch.tensor([[-100] * len(p) + o])).loss
            assert score == pytest.approx(-loss.item() * len(o), rel=1e-5)


def test_prompt_keeps_its_end_when_too_long(tokenizer):
    (item,) = prompt_eval.build_items(doc_paragraphs()[:40], seed=1, max_items=1)
    prompt = "filler words " * 200 + prompt_eval.render(item, "zero_shot", [])
    p, options = prompt_eval.encode_choices(tokenizer, prompt, item["options"], 64)
    assert len(p) + max(len(o) for o in options) == 64
    assert tokenizer.decode(p).endswith("Next sentence:")


def test_a_model_taught_the_answers_scores_them_all(tokenizer):
    items = prompt_eval.build_items(doc_paragraphs()[:60], seed=3, max_items=8)
    model = build_model(tokenizer, hidden=64, seed=1)

    def scores():
        return {
            t: prompt_eval.accuracy(model, tokenizer, items, t, shots=2, max_length=512, batch_size=8, seed=0)
            for t in prompt_eval.TEMPLATES
        }

    before = scores()
    solved = [prompt_eval.render(it, "zero_shot", []) + " " + it["options"][it["answer"]] for it in items]
    batch = hf_lm.pad_batch([hf_lm.encode_document(tokenizer, t, 512) for t in solved], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    after = scores()
    for t in prompt_eval.TEMPLATES:
        assert before[t]["accuracy"] < 1.0
        assert after[t]["accuracy"] == 1.0 and after[t]["predictions"] == [it["answer"] for it in items]


def test_evaluate_stage_through_the_runner(tmp_path, tokenizer):
    run_dir = tmp_path / "run"
    configs = resolve_configs("smoke", ["evaluate.prompt_items=12"])
    (run_dir / "tokenize").mkdir(parents=True)
    heldout = doc_paragraphs()[:40]
    with open(run_dir / "tokenize" / "heldout.jsonl", "w") as f:
        for d in heldout:
            f.write(json.dumps(d) + "\n")
    write_upstream(run_dir, configs, "tokenize", {"heldout": "heldout.jsonl"})
    chats = build_instructions(doc_paragraphs()[100:160], seed=2, split_of=by_hash(2, 0.3), chat_chars=200)
    for seed, name in enumerate(("pretrain", "sft", "align")):
        save_hf(run_dir / name / "hf", build_model(tokenizer, seed=seed), tokenizer)
        outputs = {"hf": "hf"}
        if name == "sft":
            write_jsonl(run_dir / "sft" / "instructions.jsonl", chats)
            outputs["instructions"] = "instructions.jsonl"
        write_upstream(run_dir, configs, name, outputs)

    manifest = execute_stage(str(run_dir), "evaluate", configs_to_json(configs))

    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    m = manifest["metrics"]
    assert set(report["models"]) == {"pretrain", "sft", "align"}
    assert report["heldout"]["documents"] == 40
    batch = configs["evaluate"].batch_size
    scored = [hf_lm.encode_document(tokenizer, d["text"], 256) for d in heldout[: 2 * batch]]  # smoke: 2 batches
    expected_tokens = sum(len(e["input_ids"]) - 1 for e in scored)
    val_chats = [c for c in chats if c["split"] == "val"]
    assert m["heldout_chats"] == len(val_chats) > 0 and m["prompt_items"] == 12
    items = [json.loads(line) for line in (run_dir / "evaluate" / "prompt_items.jsonl").read_text().splitlines()]
    assert items == prompt_eval.build_items(heldout, seed=configs["run"].seed, max_items=12)
    ppls = set()
    for name, result in report["models"].items():
        assert result["tokens"] == expected_tokens
        assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
        assert m[f"{name}_ppl"] == round(result["perplexity"], 3)
        assert [s["prompt"] for s in result["samples"]] == list(configs["evaluate"].prompts)
        for template in prompt_eval.TEMPLATES:
            acc = result["accuracy"][template]
            assert m[f"{name}_acc_{template}"] == round(acc, 4)
            assert acc == sum(p == it["answer"] for p, it in zip(result["predictions"][template], items)) / 12
        ppls.add(result["perplexity"])
    assert len(ppls) == 3  # three different models were scored
    lm_docs = [json.loads(line) for line in (run_dir / "evaluate" / "lm_eval_documents.jsonl").open()]
    assert lm_docs == heldout[: configs["evaluate"].lm_eval_documents]
    lm_instructions = [json.loads(line) for line in (run_dir / "evaluate" / "lm_eval_instructions.jsonl").open()]
    assert lm_instructions == lm_harness.instruction_items(val_chats)[: configs["evaluate"].lm_eval_instructions]
    assert report["lm_eval"] == {lm_harness.HELDOUT: "lm_eval_documents.jsonl", lm_harness.CLOZE: "prompt_items.jsonl",
                                 lm_harness.INSTRUCTIONS: "lm_eval_instructions.jsonl"}
    for name, result in report["models"].items():  # lm-evaluation-harness ran its three shipped tasks on every model
        heldout, cloze, instructions = (result["lm_eval"][t] for t in lm_harness.TASKS)
        assert heldout["documents"] == len(lm_docs) and heldout["loglikelihood"] < 0
        assert m[f"{name}_lmeval_bits_per_byte"] == round(heldout["bits_per_byte"], 4)
        assert cloze["items"] == 12 and m[f"{name}_lmeval_cloze_acc"] == round(cloze["acc"], 4)
        assert cloze["acc_norm"] == result["accuracy"]["zero_shot"]  # the same items, scored the same way
        assert m[f"{name}_lmeval_cloze_acc_norm"] == m[f"{name}_acc_zero_shot"]
        assert instructions["items"] == len(lm_instructions) == len(instructions["replies"])
        assert m[f"{name}_lmeval_instructions_exact_match"] == round(instructions["exact_match"], 4)
    sft, sft_tok = hf_lm.load_causal_lm(run_dir / "sft" / "hf")
    first = report["models"]["sft"]["samples"][0]
    assert first["reply"] == hf_lm.greedy_reply(sft, sft_tok, first["prompt"], max_new_tokens=8)
    # instruction perplexity: the answer tokens of the held-out chats, as the sft stage scores them
    encoded = [hf_lm.encode_chat(sft_tok, c["messages"], 256) for c in val_chats]
    nll, tokens = hf_lm.mean_nll(sft, encoded, sft_tok.pad_token_id, batch_size=3)
    assert report["models"]["sft"]["instructions"]["tokens"] == tokens
    assert report["models"]["sft"]["instructions"]["nll"] == pytest.approx(nll, rel=1e-5)
    assert m["sft_instr_ppl"] == round(math.exp(report["models"]["sft"]["instructions"]["nll"]), 3)


def test_lm_eval_harness_scores_documents_items_and_instructions_as_we_do(model, tokenizer, tmp_path):
    """lm-eval's shipped tasks (its own task types and HF model class) agree with ours: the documents' rolling
    log-likelihood, each cloze option's log-likelihood (acc_norm = our zero_shot accuracy), greedy replies."""
    context = model.config.max_position_embeddings
    docs = []
    for d in doc_paragraphs()[:60]:
        short = tokenizer.decode(tokenizer(d["text"], add_special_tokens=False)["input_ids"][: context - 8]).strip()
        if short and len(hf_lm.encode_document(tokenizer, short, 10**9)["input_ids"]) <= context:
            docs.append({"id": d["id"], "text": short})
    items = prompt_eval.build_items(doc_paragraphs()[:60], seed=3, max_items=16)
    chats = build_instructions(doc_paragraphs()[:40], seed=1, split_of=lambda _: "val", chat_chars=160)
    instructions = lm_harness.instruction_items(chats)[:5]
    ours_replies = [hf_lm.greedy_reply(model, tokenizer, it["instruction"], 32).split("\n")[0].strip()
                    for it in instructions]
    instructions[1]["answer"] = ours_replies[1]  # a planted right answer: exact match is not vacuously 0
    data = {lm_harness.HELDOUT: write_jsonl(tmp_path / "docs.jsonl", docs),
            lm_harness.CLOZE: write_jsonl(tmp_path / "items.jsonl", items),
            lm_harness.INSTRUCTIONS: write_jsonl(tmp_path / "instructions.jsonl", instructions)}
    theirs = lm_harness.score_tasks(model, tokenizer, data, context, 8)

    encoded = [hf_lm.encode_document(tokenizer, d["text"], context) for d in docs]
    nll, tokens = hf_lm.mean_nll(model, encoded, tokenizer.pad_token_id, 8)
    heldout = theirs[lm_harness.HELDOUT]
    assert heldout["documents"] == len(docs) > 30
    assert heldout["loglikelihood"] == pytest.approx(-nll * tokens, rel=1e-4)  # the issue asks 1 %; it is exact
    scored_bytes = sum(len((d["text"] + tokenizer.eos_token).encode("utf-8")) for d in docs)
    assert heldout["bits_per_byte"] == pytest.approx(-heldout["loglikelihood"] / math.log(2) / scored_bytes, rel=1e-6)

    cloze = theirs[lm_harness.CLOZE]
    prompts, options = zip(*(prompt_eval.encode_choices(tokenizer, prompt_eval.render(it, "zero_shot", []),
                                                        it["options"], context) for it in items))
    ours = hf_lm.choice_logprobs(model, list(prompts), list(options), tokenizer.pad_token_id, 8)
    assert cloze["items"] == len(items) and len(cloze["loglikelihoods"]) == len(items)
    for mine, lm_evals in zip(ours, cloze["loglikelihoods"]):
        assert lm_evals == pytest.approx(mine, rel=1e-5)  # measured: 2e-7
    zero_shot = prompt_eval.accuracy(model, tokenizer, items, "zero_shot", 0, context, 8, seed=0)
    assert cloze["acc_norm"] == zero_shot["accuracy"]  # per character, as evaluate scores its items
    best_sum = [max(range(prompt_eval.CHOICES), key=lls.__getitem__) for lls in cloze["loglikelihoods"]]
    assert cloze["acc"] == sum(p == it["answer"] for p, it in zip(best_sum, items)) / len(items)
    assert cloze["acc"] != cloze["acc_norm"]  # the two scorings differ here, so the match above is not by chance

    replies = theirs[lm_harness.INSTRUCTIONS]
    assert replies["replies"] == ours_replies  # the chat template and greedy decoding of hf_lm.greedy_reply
    assert replies["exact_match"] == pytest.approx(1 / len(instructions))
