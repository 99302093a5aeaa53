"""Evaluate any HF causal-LM checkpoint directory: held-out perplexity and greedy + sampled continuations.

    python -m recipes.eval_checkpoint RUN_DIR/pretrain/hf --heldout RUN_DIR/tokenize/heldout.jsonl \
        [--prompt TEXT ...] [--max-new-tokens 32] [--temperature 0.8 --top-k 50 --top-p 0.95] [--out report.json]

Perplexity is scored as the evaluate stage scores it (each document after an
eos, with its closing eos). Continuations start from eos + the prompt's tokens,
as pretraining packed documents, and come from `recipes.generate` with the
model's KV cache. `--lm-eval-tasks` runs lm-evaluation-harness tasks: the three
shipped in recipes/lm_eval_tasks/ over data built from the held-out file as the
evaluate stage builds it (aigc_heldout: the documents; aigc_heldout_cloze: up to
64 "which sentence comes next?" items; aigc_heldout_instructions: up to 16
continue-the-passage instructions), or any task lm-eval registers whose data is
in the local HF cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from recipes import hf_lm, lm_harness, prompt_eval
from recipes.evaluate import check_document
from recipes.generate import generate, hf_next_logits
from recipes.instructions import build_instructions, chat_char_budget, read_jsonl, write_jsonl

DEFAULT_PROMPTS = ("The for statement", "A function definition")
CLOZE_ITEMS = 64  # aigc_heldout_cloze items built from the held-out file, at most
INSTRUCTIONS = 16  # aigc_heldout_instructions chats built from the held-out file, at most


class InputError(ValueError):
    """A checkpoint directory or held-out file that cannot be read (the message is one line)."""


def continuations(
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int
) -> dict[str, str]:
    """Return {"greedy", "sampled"}: the model's continuations of plain-text `prompt`."""
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])  # [1, t]
    texts = {}
    for name, temp in (("greedy", 0.0), ("sampled", temperature)):
        out = generate(
            hf_next_logits(model), ids, max_new_tokens, temp, top_k, top_p, tokenizer.eos_token_id, seed
        )  # [1, t + n]
        texts[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return texts


def evaluate_checkpoint(
    path: Path,
    heldout: Path,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    max_length: int = 256,
    batch_size: int = 8,
    max_batches: int = 0,
    seed: int = 0,
    lm_eval_tasks: tuple[str, ...] = (),
) -> dict:
    """Return {"perplexity", "nll", "tokens", "samples", "lm_eval"} of the HF checkpoint at `path` on JSONL `heldout`.

    `samples` holds {"prompt", "greedy", "sampled"} per prompt; max_batches 0 scores every document;
    `lm_eval` the figures of lm-evaluation-harness tasks `lm_eval_tasks` (recipes.lm_harness.run_tasks).
    Raises InputError, before loading the model where it can, on a held-out file or checkpoint that cannot
    be read.
    """
    try:
        docs = read_jsonl(heldout, check_document)
    except (OSError, ValueError) as exc:
        raise InputError(f"held-out file {heldout}: {exc.strerror}" if isinstance(exc, OSError)
                         else f"held-out file {exc}") from None  # read_jsonl's message starts with file:line
    if not docs:
        raise InputError(f"held-out file {heldout}: no documents")
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"no HF checkpoint directory at {path} (config.json, weights, tokenizer)")
    try:
        model, tokenizer = hf_lm.load_causal_lm(path)
    except (OSError, ValueError) as exc:  # transformers' reasons run over several lines: keep the first
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise InputError(f"cannot load the HF checkpoint at {path}: {first}") from None
    length = hf_lm.context_length(model, max_length)
    encoded = [hf_lm.encode_document(tokenizer, d["text"], length) for d in docs]
    nll, tokens = hf_lm.mean_nll(model, encoded, tokenizer.pad_token_id, batch_size, max_batches, desc="perplexity")
    samples = [
        {"prompt": p, **continuations(model, tokenizer, p, max_new_tokens, temperature, top_k, top_p, seed)}
        for p in prompts
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = lm_eval_data(Path(tmp), heldout, docs, lm_eval_tasks, seed, length)
        try:
            harness = lm_harness.run_tasks(model, tokenizer, list(lm_eval_tasks), data, length, batch_size) \
                if lm_eval_tasks else {}
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return {"perplexity": hf_lm.perplexity(nll), "nll": nll, "tokens": tokens, "samples": samples, "lm_eval": harness}


def lm_eval_data(directory: Path, heldout: Path, docs: list[dict], tasks: tuple[str, ...], seed: int,
                 max_length: int) -> dict[str, Path]:
    """Return {task: data file} of our lm-eval tasks among `tasks`, their files built from the held-out
    documents in `directory` as the evaluate stage builds them. Raises InputError where none can be built."""
    docs = [{"id": str(d.get("id", i)), "text": d["text"]} for i, d in enumerate(docs)]
    data: dict[str, Path] = {lm_harness.HELDOUT: heldout}
    if lm_harness.CLOZE in tasks:
        items = prompt_eval.build_items(docs, seed, CLOZE_ITEMS)
        if not items:
            raise InputError(f"held-out file {heldout}: no {lm_harness.CLOZE} item can be built (documents of two "
                             f"sentences or more, {prompt_eval.CHOICES} documents at least)")
        data[lm_harness.CLOZE] = write_jsonl(directory / "prompt_items.jsonl", items)
    if lm_harness.INSTRUCTIONS in tasks:
        chats = build_instructions(docs, seed, lambda _: "val", chat_char_budget(max_length))
        items = lm_harness.instruction_items(chats)[:INSTRUCTIONS]
        if not items:
            raise InputError(f"held-out file {heldout}: no {lm_harness.INSTRUCTIONS} item can be built "
                             "(documents of two sentences or more)")
        data[lm_harness.INSTRUCTIONS] = write_jsonl(directory / "lm_eval_instructions.jsonl", items)
    return data


def main(argv: list[str] | None = None) -> int:
    """Entry point of `aigc eval-checkpoint`; return the exit code (2, after one line, on an input error)."""
    parser = argparse.ArgumentParser(prog="aigc eval-checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="an HF checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--heldout", type=Path, required=True, help='JSONL of {"text": ...} documents')
    parser.add_argument("--prompt", action="append", help="a prompt to continue (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-batches", type=int, default=0, help="held-out batches scored; 0 = all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-eval-tasks", default="", metavar="NAMES",
                        help=f"comma-separated lm-evaluation-harness tasks: ours, over the --heldout documents "
                        f"({lm_harness.HELDOUT}: rolling log-likelihood, word/byte perplexity and bits per byte; "
                        f"{lm_harness.CLOZE}: 4-way next-sentence multiple choice, acc and acc_norm; "
                        f"{lm_harness.INSTRUCTIONS}: greedy answers to continue-the-passage instructions, exact "
                        "match), or any task lm-eval registers (e.g. hellaswag, arc_easy) whose dataset is already in "
                        "the local HF cache (no downloads)")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        report = evaluate_checkpoint(
            args.checkpoint,
            args.heldout,
            tuple(args.prompt or DEFAULT_PROMPTS),
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            max_batches=args.max_batches,
            seed=args.seed,
            lm_eval_tasks=tuple(t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()),
        )
    except InputError as exc:
        print(f"aigc eval-checkpoint: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    title = f"{args.checkpoint}: perplexity {report['perplexity']:.2f} over {report['tokens']:,} tokens"
    table = Table(title=Text(title))
    for column in ("prompt", "greedy", f"sampled (T={args.temperature}, k={args.top_k}, p={args.top_p})"):
        table.add_column(column)
    for s in report["samples"]:
        table.add_row(Text(s["prompt"]), Text(repr(s["greedy"])), Text(repr(s["sampled"])))  # not markup
    Console().print(table)
    if report["lm_eval"]:
        harness = Table(title="lm-evaluation-harness")
        for column in ("task", "metric", "value"):
            harness.add_column(column)
        for task, figures in report["lm_eval"].items():
            for metric, value in figures.items():
                if isinstance(value, list):  # per-item figures: in --out only
                    continue
                harness.add_row(Text(task), Text(metric), f"{value:.4f}" if isinstance(value, float) else Text(str(value)))
        Console().print(harness)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
