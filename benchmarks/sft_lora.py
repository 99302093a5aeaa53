"""SFT against LoRA and DoRA on one pretrained checkpoint: held-out instruction loss, prompting accuracy, cost.

From a run directory where `aigc run` has finished curate, tokenize and
pretrain, this builds the sft stage's "continue this passage" chats from the
curated corpus (same seed, split and encoding as the stage) and tunes three
copies of the pretrained model with the stage's own loop (recipes.sft) for
the same steps on the same batches: full SFT (every weight, --full-lr), LoRA
and DoRA (the `tiny` recipe: rank 8 on every projection, lr 2e-3). It
reports, for the base model and each tuned one:

- held-out instruction loss (mean NLL of the answer tokens of held-out chats);
- prompting accuracy, zero-shot and few-shot, on the evaluate stage's
  multiple-choice items built from the tokenize stage's held-out documents;
- trainable parameters (fraction of the model) and the time of one training
  step relative to full SFT. Steps of the three are interleaved on the same
  batch and each is timed by its median, so load from other processes
  distorts the ratio as little as it can; absolute times depend on the
  machine and its load.

    python benchmarks/sft_lora.py RUN_DIR [--steps 100] [--full-lr 2e-4] [--threads 1] [--out sft_lora.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from curation.corpus import read_corpus
from curation.split import read_split
from recipes import hf_lm, prompt_eval
from recipes.evaluate import check_document
from recipes.instructions import build_instructions, chat_char_budget, read_jsonl
from recipes.sft import add_lora, fine_tune, heldout_loss, select_examples
from recipes.sft_recipes import resolve_config
from recipes.stages import EvaluateConfig, SFTConfig
from record import save

SEED = 1234  # the pipeline's default run seed


def variants(steps: int, full_lr: float) -> dict[str, SFTConfig]:
    """Return name -> resolved sft config of the three ways to tune (same steps, batches and schedule)."""
    common = dict(max_steps=steps, eval_every=0)
    return {
        "full SFT": resolve_config(SFTConfig(mode="full", learning_rate=full_lr, **common)),
        "LoRA": resolve_config(SFTConfig(mode="lora", **common)),
        "DoRA": resolve_config(SFTConfig(mode="lora", use_dora=True, **common)),
    }


def prepared(base_dir: Path, cfg: SFTConfig) -> torch.nn.Module:
    """Return a fresh copy of the base model ready to tune as `cfg` says (LoRA-wrapped, or all weights)."""
    model, _ = hf_lm.load_causal_lm(base_dir)
    return add_lora(model, cfg) if cfg.mode == "lora" else model


def step_seconds(models: dict, rows: list[dict], pad_id: int, repeats: int) -> dict[str, float]:
    """Return name -> median seconds of one training step (forward, backward, clip, AdamW) on the same batch.

    The models' steps are interleaved, `repeats` each, after one untimed warm-up step.
    """
    batch = hf_lm.collate_rows(rows, pad_id)
    optimizers = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6) for n, m in models.items()
    }
    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(repeats + 1):
        for name, model in models.items():
            model.train()
            started = time.perf_counter()
            nll, count = hf_lm.forward_nll(model, batch)
            optimizers[name].zero_grad(set_to_none=True)
            (nll / count).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizers[name].step()
            if r:
                times[name].append(time.perf_counter() - started)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    """Tune, score and time the three variants; print a table and save the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--full-lr", type=float, default=2e-4)
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write here instead of benchmarks/results/sft_lora.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base_dir = args.run_dir / "pretrain" / "hf"
    base, tokenizer = hf_lm.load_causal_lm(base_dir)
    configs = variants(args.steps, args.full_lr)
    tiny = configs["LoRA"]
    max_length = hf_lm.context_length(base, tiny.max_length)
    docs = read_corpus(args.run_dir / "curate" / "corpus")
    split = read_split(args.run_dir / "tokenize" / "split.json")  # the chain's one split, as the stage reads it
    records = build_instructions(docs, SEED, split.of, chat_char_budget(max_length))
    fitting = [r for r in records if hf_lm.prompt_fits(tokenizer, r["messages"][:-1], max_length)]
    train, val = select_examples(fitting, tiny, SEED)
    encoded = {
        split: [hf_lm.encode_chat(tokenizer, r["messages"], max_length) for r in records]
        for split, records in (("train", train), ("val", val))
    }
    rows = hf_lm.pack_examples(encoded["train"], max_length, packing=False)
    val_rows = hf_lm.pack_examples(encoded["val"], max_length, packing=False)
    pad_id = tokenizer.pad_token_id
    heldout_docs = read_jsonl(args.run_dir / "tokenize" / "heldout.jsonl", check_document)
    ev = EvaluateConfig()
    items = prompt_eval.build_items(heldout_docs, SEED, ev.prompt_items)

    def scores(model: torch.nn.Module) -> dict:
        accuracy = {
            t: prompt_eval.accuracy(model, tokenizer, items, t, ev.few_shot, max_length, ev.batch_size, SEED)
            for t in prompt_eval.TEMPLATES
        }
        accuracy = {t: a["accuracy"] for t, a in accuracy.items()}
        return {"val_loss": heldout_loss(model, val_rows, pad_id, tiny)[0], **accuracy}

    results = {"base": scores(base) | {"trainable": 0, "fraction": 0.0}}
    models = {}
    for name, cfg in configs.items():
        torch.manual_seed(SEED)
        model = prepared(base_dir, cfg)
        fine_tune(model, rows, val_rows, pad_id, cfg, SEED)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        results[name] = scores(model) | {"trainable": trainable, "fraction": trainable / total}
        models[name] = model
    timing = step_seconds(models, rows[: tiny.batch_size], pad_id, args.timing_steps)
    for name, seconds in timing.items():
        results[name] |= {"step_s": seconds, "step_ratio": seconds / timing["full SFT"]}

    chance = 1 / prompt_eval.CHOICES
    table = Table(title=f"SFT vs LoRA vs DoRA: {args.steps} steps of {tiny.batch_size} chats, "
                        f"{len(val)} held-out chats, {len(items)} prompting items (chance {chance:.2f})")
    for column in ("model", "held-out instr. loss", "acc zero-shot", "acc few-shot", "trainable", "fraction",
                   "step s", "step / full"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in results.items():
        table.add_row(
            name, f"{r['val_loss']:.4f}", f"{r['zero_shot']:.3f}", f"{r['few_shot']:.3f}", f"{r['trainable']:,}",
            f"{r['fraction']:.4f}", f"{r['step_s']:.4f}" if "step_s" in r else "",
            f"{r['step_ratio']:.2f}" if "step_ratio" in r else "",
        )
    Console(width=140).print(table)
    save("sft_lora", {"steps": args.steps, "batch": tiny.batch_size, "heldout_chats": len(val), "items": len(items),
                      "chance": chance, "results": results}, args.out)


if __name__ == "__main__":
    main()
