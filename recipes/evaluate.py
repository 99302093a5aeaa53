"""The `evaluate` stage: perplexity, prompting accuracy and greedy samples of the pretrain, sft and align models.

Perplexity is exp(mean next-token NLL) over the held-out documents of the
tokenize stage, pooled over tokens; each document is scored as pretraining
packed it (after an eos, with its closing eos). Instruction perplexity is the
same over the answer tokens of the sft stage's held-out chats, rendered with
the chat template. Prompting accuracy is "which sentence comes next?"
multiple choice (recipes.prompt_eval) over items built from the held-out
documents, zero-shot and few-shot, the same items for every model. Samples
are greedy replies (HF generate with KV cache) to fixed chat prompts. Then
lm-evaluation-harness runs the three task YAMLs shipped in
recipes/lm_eval_tasks/ through its HF model class (recipes.lm_harness):
aigc_heldout, its rolling log-likelihood over the first `lm_eval_documents`
held-out documents (word/byte perplexity and bits per byte, comparable across
tokenizers); aigc_heldout_cloze, the same prompting items as multiple choice
(acc; acc_norm, which scores as we do, so it equals our zero_shot accuracy
where prompts fit the context); aigc_heldout_instructions, greedy answers to
the first `lm_eval_instructions` held-out chats, graded by exact match. All of
it goes to report.json; the items to prompt_items.jsonl, lm-eval's documents
to lm_eval_documents.jsonl, its instructions to lm_eval_instructions.jsonl.
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
LM_EVAL_METRICS = (  # (task, manifest metric <model>_lmeval_<key>, lm-eval metric)
    (lm_harness.HELDOUT, "bits_per_byte", "bits_per_byte"),
    (lm_harness.HELDOUT, "byte_ppl", "byte_perplexity"),
    (lm_harness.CLOZE, "cloze_acc", "acc"),
    (lm_harness.CLOZE, "cloze_acc_norm", "acc_norm"),
    (lm_harness.INSTRUCTIONS, "instructions_exact_match", "exact_match"),
)


def check_document(record: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a {"id", "text"} document."""
    if not (isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip()):
        raise ValueError(f"{where}: a held-out document needs a non-empty string 'text'")


def evaluate_model(
    name: str, model_dir: Path, docs: list[dict], chats: list[dict], items: list[dict], cfg: EvaluateConfig, seed: int,
    lm_eval_data: dict[str, Path] | None = None,
) -> dict:
    """Return {"perplexity", "nll", "tokens", "instructions", "accuracy", "samples", "lm_eval"} of checkpoint `name`.

    "instructions": {"perplexity", "nll", "tokens"} on the answers of `chats`;
    "accuracy": template -> share of `items` answered right; "lm_eval":
    lm_harness.score_tasks over `lm_eval_data` (task -> data file; None: not run).
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
        "lm_eval": lm_harness.score_tasks(model, tokenizer, lm_eval_data, max_length, cfg.batch_size)
        if lm_eval_data else None,
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
    lm_eval_data = _write_lm_eval_data(ctx.out_dir, docs, chats, items, cfg)
    results = {
        name: evaluate_model(name, ctx.input_path(name, "hf"), docs, chats, items, cfg, ctx.seed, lm_eval_data)
        for name in MODELS
    }
    report = {
        "heldout": {"path": str(heldout_path.relative_to(ctx.run_dir)), "documents": len(docs)},
        "instructions": {"chats": len(chats)},
        "prompting": {"items": len(items), "choices": prompt_eval.CHOICES, "chance": 1 / prompt_eval.CHOICES},
        "lm_eval": {task: str(path.relative_to(ctx.out_dir)) for task, path in (lm_eval_data or {}).items()},
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
        for task, key, metric in LM_EVAL_METRICS:
            if task in (r["lm_eval"] or {}):
                metrics[f"{name}_lmeval_{key}"] = round(r["lm_eval"][task][metric], 4)
    metrics["wall_time_s"] = round(time.time() - started, 2)
    _print_summary(results, len(items))
    return StageResult(outputs={"report": "report.json", "prompt_items": "prompt_items.jsonl",
                                "lm_eval_documents": "lm_eval_documents.jsonl",
                                "lm_eval_instructions": "lm_eval_instructions.jsonl"}, metrics=metrics)


def _write_lm_eval_data(out_dir: Path, docs: list[dict], chats: list[dict], items: list[dict],
                        cfg: EvaluateConfig) -> dict[str, Path] | None:
    """Write lm-eval's documents and instructions beside prompt_items.jsonl; return {task: data file} of the
    lm-eval tasks to run (None where lm_eval_documents is 0: lm-eval off)."""
    documents = write_jsonl(out_dir / "lm_eval_documents.jsonl",
                            [{"id": d["id"], "text": d["text"]} for d in docs[: cfg.lm_eval_documents]])
    instructions = lm_harness.instruction_items(chats)[: cfg.lm_eval_instructions]
    write_jsonl(out_dir / "lm_eval_instructions.jsonl", instructions)
    if not cfg.lm_eval_documents:
        return None
    data = {lm_harness.HELDOUT: documents}
    if items:
        data[lm_harness.CLOZE] = out_dir / "prompt_items.jsonl"
    if instructions:
        data[lm_harness.INSTRUCTIONS] = out_dir / "lm_eval_instructions.jsonl"
    return data


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
    shown = [(task, key, metric) for task, key, metric in LM_EVAL_METRICS
             if any(task in (r["lm_eval"] or {}) for r in results.values())]
    if shown:
        harness = Table(title="lm-evaluation-harness (recipes/lm_eval_tasks)")
        for c in ("model", *(key for _, key, _ in shown)):
            harness.add_column(c, justify="left" if c == "model" else "right")
        for name, r in results.items():
            harness.add_row(name, *(f"{r['lm_eval'][task][metric]:.4f}" if task in (r["lm_eval"] or {}) else "-"
                                    for task, _, metric in shown))
        Console().print(harness)
