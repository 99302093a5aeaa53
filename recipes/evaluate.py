"""The `evaluate` stage: perplexity, prompting accuracy and greedy samples of the pretrain, sft and align models.

Perplexity is exp(mean next-token NLL) over the held-out documents of the
tokenize stage, pooled over tokens; each document is scored as pretraining
packed it (after an eos, with its closing eos). Instruction perplexity is the
same over the answer tokens of the sft stage's held-out chats, rendered with
the chat template. Prompting accuracy is "which sentence comes next?"
multiple choice (recipes.prompt_eval) over items built from the held-out
documents, zero-shot and few-shot, the same items for every model. Samples
are greedy replies (HF generate with KV cache) to fixed chat prompts. The
first `lm_eval_documents` held-out documents are also scored by
lm-evaluation-harness (recipes.lm_harness: its rolling log-likelihood task,
word/byte perplexity and bits per byte, comparable across tokenizers). All of
it goes to report.json; the items to prompt_items.jsonl, lm-eval's documents
to lm_eval_documents.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.stage import StageContext, StageResult
from recipes import hf_lm, lm_harness, prompt_eval
from recipes.instructions import read_instructions, read_jsonl, write_jsonl
from recipes.stages import EvaluateConfig

MODELS = ("pretrain", "sft", "align")  # upstream stages whose `hf` output is evaluated


def check_document(record: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a {"id", "text"} document."""
    if not (isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip()):
        raise ValueError(f"{where}: a held-out document needs a non-empty string 'text'")


def evaluate_model(
    name: str, model_dir: Path, docs: list[dict], chats: list[dict], items: list[dict], cfg: EvaluateConfig, seed: int,
    lm_eval_docs: Path | None = None,
) -> dict:
    """Return {"perplexity", "nll", "tokens", "instructions", "accuracy", "samples", "lm_eval"} of checkpoint `name`.

    "instructions": {"perplexity", "nll", "tokens"} on the answers of `chats`;
    "accuracy": template -> share of `items` answered right; "lm_eval":
    lm_harness.score_heldout on the documents of `lm_eval_docs` (None: not run).
    """
    model, tokenizer = hf_lm.load_causal_lm(model_dir)
    max_length = hf_lm.context_length(model, cfg.max_length)
    pad_id = tokenizer.pad_token_id
    encoded = [hf_lm.encode_document(tokenizer, d["text"], max_length) for d in docs]
    nll, tokens = hf_lm.mean_nll(model, encoded, pad_id, cfg.batch_size, cfg.max_batches, desc=f"perplexity {name}")
    chat_ids = [hf_lm.encode_chat(tokenizer, c["messages"], max_length) for c in chats]
    chat_nll, chat_tokens = hf_lm.mean_nll(model, chat_ids, pad_id, cfg.batch_size, desc=f"instructions {name}")
    accuracy = {
        t: prompt_eval.accuracy(model, tokenizer, items, t, cfg.few_shot, max_length, cfg.batch_size, seed)
        for t in (prompt_eval.TEMPLATES if items else ())
    }
    samples = [
        {"prompt": p, "reply": hf_lm.greedy_reply(model, tokenizer, p, cfg.max_new_tokens)} for p in cfg.prompts
    ]
    return {
        "perplexity": hf_lm.perplexity(nll),
        "nll": nll,
        "tokens": tokens,
        "instructions": {"perplexity": hf_lm.perplexity(chat_nll), "nll": chat_nll, "tokens": chat_tokens},
        "accuracy": {t: r["accuracy"] for t, r in accuracy.items()},
        "predictions": {t: r["predictions"] for t, r in accuracy.items()},
        "samples": samples,
        "lm_eval": lm_harness.score_heldout(model, tokenizer, lm_eval_docs, max_length, cfg.batch_size)
        if lm_eval_docs else None,
    }


def run(ctx: StageContext) -> StageResult:
    """Score every model on the held-out text, chats and prompting items, sample replies, write report.json."""
    cfg: EvaluateConfig = ctx.config
    started = time.time()
    heldout_path = ctx.input_path("tokenize", "heldout")
    docs = read_jsonl(heldout_path, check_document)
    if not docs:
        raise ValueError(f"no held-out documents in {heldout_path}")
    chats = [r for r in read_instructions(ctx.input_path("sft", "instructions")) if r["split"] == "val"]
    if not chats:
        raise ValueError("the sft stage kept no held-out instructions to score")
    items = prompt_eval.build_items(docs, ctx.seed, cfg.prompt_items)
    if cfg.prompt_items and not items:
        raise ValueError(f"no prompting item could be built from the {len(docs)} held-out documents")
    write_jsonl(ctx.out_dir / "prompt_items.jsonl", items)
    lm_eval_docs = ctx.out_dir / "lm_eval_documents.jsonl"
    write_jsonl(lm_eval_docs, [{"id": d["id"], "text": d["text"]} for d in docs[: cfg.lm_eval_documents]])
    results = {
        name: evaluate_model(name, ctx.input_path(name, "hf"), docs, chats, items, cfg, ctx.seed,
                             lm_eval_docs if cfg.lm_eval_documents else None)
        for name in MODELS
    }
    report = {
        "heldout": {"path": str(heldout_path.relative_to(ctx.run_dir)), "documents": len(docs)},
        "instructions": {"chats": len(chats)},
        "prompting": {"items": len(items), "choices": prompt_eval.CHOICES, "chance": 1 / prompt_eval.CHOICES},
        "config": dataclasses.asdict(cfg),
        "models": results,
    }
    with open(ctx.out_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")

    metrics = {"heldout_tokens": results[MODELS[0]]["tokens"], "heldout_chats": len(chats), "prompt_items": len(items)}
    for name, r in results.items():
        metrics[f"{name}_ppl"] = round(r["perplexity"], 3)
        metrics[f"{name}_nll"] = round(r["nll"], 5)
        metrics[f"{name}_instr_ppl"] = round(r["instructions"]["perplexity"], 3)
        metrics[f"{name}_instr_nll"] = round(r["instructions"]["nll"], 5)
        for template, acc in r["accuracy"].items():
            metrics[f"{name}_acc_{template}"] = round(acc, 4)
        if r["lm_eval"]:
            metrics[f"{name}_lmeval_bits_per_byte"] = round(r["lm_eval"]["bits_per_byte"], 4)
            metrics[f"{name}_lmeval_byte_ppl"] = round(r["lm_eval"]["byte_perplexity"], 4)
    metrics["wall_time_s"] = round(time.time() - started, 2)
    _print_summary(results, len(items))
    return StageResult(outputs={"report": "report.json", "prompt_items": "prompt_items.jsonl",
                                "lm_eval_documents": "lm_eval_documents.jsonl"}, metrics=metrics)


def _print_summary(results: dict, items: int) -> None:
    """Print model | ppl | instruction ppl | accuracy per template, then each model's first sample, as rich tables."""
    templates = prompt_eval.TEMPLATES if items else ()
    scores = Table(title=f"evaluate: held-out perplexity; prompting accuracy over {items} items (chance "
                   f"{1 / prompt_eval.CHOICES:.2f})")
    samples = Table(title="greedy sample (first prompt)")
    for table, columns in ((scores, ("model", "ppl", "instr ppl", *(f"acc {t}" for t in templates))),
                           (samples, ("model", "reply"))):
        for c in columns:
            table.add_column(c, justify="left" if c in ("model", "reply") else "right")
    for name, r in results.items():
        scores.add_row(
            name,
            f"{r['perplexity']:.2f}",
            f"{r['instructions']['perplexity']:.2f}",
            *(f"{r['accuracy'][t]:.3f}" for t in templates),
        )
        samples.add_row(name, Text(repr(r["samples"][0]["reply"]) if r["samples"] else ""))  # not markup
    Console().print(scores)
    Console().print(samples)
