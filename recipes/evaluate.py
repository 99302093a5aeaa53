"""The `evaluate` stage: held-out perplexity and greedy samples of the pretrain, sft and align models.

Perplexity is exp(mean next-token NLL) over the held-out documents of the
tokenize stage, pooled over tokens; each document is scored as pretraining
packed it (after an eos, with its closing eos). Samples are greedy replies
(HF generate with KV cache) to fixed chat prompts. All of it goes to
report.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.stage import StageContext, StageResult
from recipes import hf_lm
from recipes.instructions import read_jsonl
from recipes.stages import EvaluateConfig

MODELS = ("pretrain", "sft", "align")  # upstream stages whose `hf` output is evaluated


def check_document(record: object, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `record` is a {"id", "text"} document."""
    if not (isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip()):
        raise ValueError(f"{where}: a held-out document needs a non-empty string 'text'")


def evaluate_model(name: str, model_dir: Path, docs: list[dict], cfg: EvaluateConfig) -> dict:
    """Return {"perplexity", "nll", "tokens", "samples"} of the HF checkpoint `name` in `model_dir`."""
    model, tokenizer = hf_lm.load_causal_lm(model_dir)
    max_length = hf_lm.context_length(model, cfg.max_length)
    encoded = [hf_lm.encode_document(tokenizer, d["text"], max_length) for d in docs]
    nll, tokens = hf_lm.mean_nll(
        model, encoded, tokenizer.pad_token_id, cfg.batch_size, cfg.max_batches, desc=f"perplexity {name}"
    )
    samples = [
        {"prompt": p, "reply": hf_lm.greedy_reply(model, tokenizer, p, cfg.max_new_tokens)} for p in cfg.prompts
    ]
    return {"perplexity": hf_lm.perplexity(nll), "nll": nll, "tokens": tokens, "samples": samples}


def run(ctx: StageContext) -> StageResult:
    """Score every model on the held-out text, sample replies, write report.json."""
    cfg: EvaluateConfig = ctx.config
    started = time.time()
    heldout_path = ctx.input_path("tokenize", "heldout")
    docs = read_jsonl(heldout_path, check_document)
    if not docs:
        raise ValueError(f"no held-out documents in {heldout_path}")
    results = {name: evaluate_model(name, ctx.input_path(name, "hf"), docs, cfg) for name in MODELS}
    report = {
        "heldout": {"path": str(heldout_path.relative_to(ctx.run_dir)), "documents": len(docs)},
        "config": dataclasses.asdict(cfg),
        "models": results,
    }
    with open(ctx.out_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")

    metrics = {"heldout_tokens": results[MODELS[0]]["tokens"]}
    for name, r in results.items():
        metrics[f"{name}_ppl"] = round(r["perplexity"], 3)
        metrics[f"{name}_nll"] = round(r["nll"], 5)
    metrics["wall_time_s"] = round(time.time() - started, 2)
    _print_summary(results)
    return StageResult(outputs={"report": "report.json"}, metrics=metrics)


def _print_summary(results: dict) -> None:
    """Print model | ppl | first sample as a rich table."""
    table = Table(title="evaluate: held-out perplexity and a greedy sample")
    table.add_column("model")
    table.add_column("ppl", justify="right")
    table.add_column("sample (first prompt)")
    for name, r in results.items():
        table.add_row(name, f"{r['perplexity']:.2f}", repr(r["samples"][0]["reply"]) if r["samples"] else "")
    Console().print(table)
