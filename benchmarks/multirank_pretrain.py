"""Multi-rank pretraining throughput: DP=2, TP=2 and PP=2 against one rank, on the same cores and global batch.

Runs `curate` and `tokenize` of the config once in --run-dir (cached), then the
`pretrain` stage once per layout, each launched as users launch it (NeMo-Run's
LocalExecutor; torchrun with gloo for 2 ranks), with the same model, data,
steps and global batch. Prints training tokens/s (from each manifest: time in
training steps only) and its ratio to the one-rank run on the same two cores
(1 rank x 2 threads) and to one rank on one core, plus each layout's final
validation loss (equal across layouts: they train the same model).

    python benchmarks/multirank_pretrain.py [--config tiny] [--run-dir runs/multirank-bench]
        [--steps 30] [--global-batch 16] [key=value ...]
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

# (name, ranks, threads per rank, overrides)
LAYOUTS = (
    ("1 rank x 1 thread", 1, 1, []),
    ("1 rank x 2 threads", 1, 2, []),
    ("DP2 (2 ranks x 1 thread)", 2, 1, []),
    ("TP2 (2 ranks x 1 thread)", 2, 1, ["pretrain.tensor_parallel=2"]),
    ("PP2 (2 ranks x 1 thread)", 2, 1, ["pretrain.pipeline_parallel=2"]),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--run-dir", default="runs/multirank-bench")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    common = [f"pretrain.max_steps={args.steps}", f"pretrain.global_batch_size={args.global_batch}",
              f"pretrain.eval_every={args.steps}", f"pretrain.checkpoint_every={args.steps}", *args.overrides]
    states = run_stages(run_dir, resolve_configs(args.config, common), ["curate", "tokenize"])
    assert set(states.values()) == {"completed"}, states

    results = {}
    for name, ranks, threads, overrides in LAYOUTS:
        shutil.rmtree(run_dir / "pretrain", ignore_errors=True)  # threads are not in the fingerprint: run anew
        configs = resolve_configs(args.config, [*common, f"threads={threads}", *overrides])
        state = run_stages(run_dir, configs, ["pretrain"], nproc_per_node=ranks)["pretrain"]
        if state != "completed":
            raise SystemExit(f"{name}: the pretrain stage {state}; see {run_dir}/pretrain.tmp/failure*.json")
        manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
        results[name] = manifest["metrics"]

    base1, base2 = results[LAYOUTS[0][0]]["tokens_per_s"], results[LAYOUTS[1][0]]["tokens_per_s"]
    m = results[LAYOUTS[0][0]]
    table = Table(title=f"pretrain {args.config}: {m['params']:,} params, {args.steps} steps, global batch "
                        f"{args.global_batch} x seq {m['train_tokens'] // (args.steps * args.global_batch)}")
    for col in ("layout", "tokens/s", "x (1 rank x 2 threads)", "x (1 rank x 1 thread)", "val loss", "step s"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for name, metrics in results.items():
        rate = metrics["tokens_per_s"]
        step_s = metrics["train_tokens"] / rate / metrics["steps"]
        table.add_row(name, f"{rate:,.0f}", f"{rate / base2:.2f}x", f"{rate / base1:.2f}x",
                      f"{metrics['val_loss']:.4f}", f"{step_s:.3f}")
    Console().print(table)
    save("multirank_pretrain", {"config": args.config, "steps": args.steps, "global_batch": args.global_batch,
                                "overrides": args.overrides, "layouts": results})


if __name__ == "__main__":
    main()
