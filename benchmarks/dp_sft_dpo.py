"""Data-parallel SFT and DPO throughput: DP=2 x 1 thread against 1 rank x 2 threads, same cores and global batch.

Runs `curate`, `tokenize` and a one-rank `pretrain` of the config once in
--run-dir (cached), then the `sft` and `align` (DPO) stages once per layout,
launched as users launch them (NeMo-Run's LocalExecutor; torchrun with gloo for
2 ranks; `stage_ranks=pretrain=1` keeps the one-rank pretrain). Prints each
stage's training tokens/s (from its manifest: time in training steps only),
its ratio to the one-rank run on the same two cores (1 rank x 2 threads), and
the final losses (equal across layouts: they train the same models).

    python benchmarks/dp_sft_dpo.py [--config smoke] [--run-dir runs/dp-bench] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.execution import run_stages  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from record import save  # noqa: E402

# (name, ranks, threads per rank)
LAYOUTS = (("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2), ("DP2 (2 ranks x 1 thread)", 2, 1))
# A model large enough for compute to matter (the tiny recipe), briefly pretrained: throughput, not quality.
DEFAULTS = ["pretrain.model=tiny", "pretrain.max_steps=10", "pretrain.eval_every=10", "sft.max_steps=20",
            "sft.batch_size=8", "sft.lora_dropout=0.0", "sft.max_examples=256", "sft.eval_every=0",
            "align.method=dpo", "align.max_steps=20", "align.rm_steps=4", "align.batch_size=8",
            "align.judge_prompts=4", "align.max_pairs=256", "stage_ranks=pretrain=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smoke")
    parser.add_argument("--run-dir", default="runs/dp-bench")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    common = [*DEFAULTS, *args.overrides]
    states = run_stages(run_dir, resolve_configs(args.config, common), ["curate", "tokenize", "pretrain"])
    assert set(states.values()) == {"completed"}, states

    results = {}
    for name, ranks, threads in LAYOUTS:
        for stage in ("sft", "align"):  # threads are not in the fingerprint: run anew
            shutil.rmtree(run_dir / stage, ignore_errors=True)
        configs = resolve_configs(args.config, [*common, f"threads={threads}"])
        states = run_stages(run_dir, configs, ["sft", "align"], nproc_per_node=ranks, env={"OMP_NUM_THREADS": str(threads)})
        if set(states.values()) != {"completed"}:
            raise SystemExit(f"{name}: {states}; see {run_dir}/<stage>.tmp/failure*.json")
        results[name] = {s: json.loads((run_dir / s / "manifest.json").read_text())["metrics"] for s in ("sft", "align")}

    base = results[LAYOUTS[1][0]]
    sft = base["sft"]
    table = Table(title=f"sft ({sft['mode']}, {sft['steps']} steps x {sft['global_batch_rows']} chats) and dpo "
                        f"({base['align']['steps']} steps x {configs['align'].batch_size} pairs), {args.config}")
    for col in ("layout", "sft tokens/s", "x (1 rank x 2 threads)", "sft final loss",
                "dpo tokens/s", "x (1 rank x 2 threads)", "dpo final loss"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for name, m in results.items():
        table.add_row(name, f"{m['sft']['tokens_per_s']:,.0f}",
                      f"{m['sft']['tokens_per_s'] / base['sft']['tokens_per_s']:.2f}x",
                      f"{m['sft']['train_loss_end']:.4f}", f"{m['align']['tokens_per_s']:,.0f}",
                      f"{m['align']['tokens_per_s'] / base['align']['tokens_per_s']:.2f}x",
                      f"{m['align']['train_loss_end']:.4f}")
    Console().print(table)
    save("dp_sft_dpo", {"config": args.config, "overrides": common, "dpo_batch": configs['align'].batch_size,
                        "layouts": results})


if __name__ == "__main__":
    main()
