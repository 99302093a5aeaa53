"""The alignment methods side by side: DPO, PPO, GRPO and SteerLM from the same SFT model, judged alike.

Runs the chain up to `sft` in --run-dir (cached stages are skipped), then the
`align` stage once per method into <run-dir>/align-<method>/ (cached too, so
a re-run only prints the table). Each method trains its own reward model
(same data, same seed: the same judge) and is judged on the same held-out
prompts: the reward model's mean score of the SFT model's and of the aligned
model's sampled answers, the aligned model's win rate against the SFT model,
KL(aligned || SFT) in nats per answer, and wall time. PPO and GRPO optimise
that very reward model, so their scores are the reward they were trained for;
DPO and SteerLM never see it.

    python benchmarks/alignment_methods.py [--config tiny] [--run-dir runs/align-bench]
        [--methods dpo,ppo,grpo,steerlm] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import configs_to_json, execute_stage  # noqa: E402
from record import save  # noqa: E402

UPSTREAM = ("curate", "tokenize", "pretrain", "sft")
COLUMNS = (  # (metric, header)
    ("judge_score_sft", "RM score SFT"),
    ("judge_score_aligned", "RM score aligned"),
    ("win_rate_vs_sft", "win rate vs SFT"),
    ("kl_from_reference", "KL (nats/answer)"),
    ("response_tokens_aligned", "answer tokens"),
    ("train_time_s", "train s"),
    ("wall_time_s", "stage wall s"),
)


def method_figure(metrics: dict) -> str:
    """Return the method's own headline figure as text."""
    method = metrics["method"]
    if method == "dpo":
        return f"held-out reward acc {metrics['val_rewards_accuracies_after']:.2f}"
    if method in ("ppo", "grpo"):
        return f"train reward {metrics['rl_reward_first']:.2f} -> {metrics['rl_reward_last']:.2f}"
    words = ", ".join(f"{w:.1f}" for w in metrics["steer_words_by_verbosity"])
    return f"words at verbosity 0..4: {words}"


def main() -> None:
    """Run the chain to sft, align with each method, print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--run-dir", default="runs/align-bench")
    parser.add_argument("--methods", default="dpo,ppo,grpo,steerlm")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every stage, e.g. align.rm_steps=30")
    args = parser.parse_args()

    run_dir = str(Path(args.run_dir).resolve())
    configs = resolve_configs(args.config, args.overrides)
    for stage in UPSTREAM:
        execute_stage(run_dir, stage, configs_to_json(configs))
    results = {}
    for method in args.methods.split(","):
        method_configs = resolve_configs(args.config, args.overrides + [f"align.method={method}"])
        out = str(Path(run_dir) / f"align-{method}")
        results[method] = execute_stage(run_dir, "align", configs_to_json(method_configs), output_dir=out)["metrics"]

    first = next(iter(results.values()))
    table = Table(
        title=f"alignment methods, config {args.config}: {first['train_pairs']} pairs, "
        f"{first['judge_prompts']} judged held-out prompts, reward model held-out accuracy {first['rm_val_accuracy']}"
    )
    table.add_column("method")
    for _, header in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("the method's own figure")
    for method, metrics in results.items():
        table.add_row(method, *(f"{metrics[key]:.3f}" if isinstance(metrics[key], float) else str(metrics[key])
                                for key, _ in COLUMNS), method_figure(metrics))
    Console().print(table)
    save("alignment_methods", {"config": args.config, "overrides": args.overrides, "methods": results})


if __name__ == "__main__":
    main()
