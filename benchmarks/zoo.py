"""The generative-model zoo, measured: every registered recipe trained with its default config, one table.

Runs t2i_data -> zoo_<recipe> for each recipe of multimodal/zoo/registry.py on the
pipeline's runner (NeMo-Run, local; finished stages of an unchanged config are
reused, so a rerun only trains what changed), then tabulates from the manifests:
test bits/dim where the model has a likelihood, the judge's FID-like distance of
its samples (beside the real-vs-real floor), the judge's accuracy for conditional
models, the recipe's key metrics, training seconds and the stage's wall time.
Times are wall-clock on whatever else the machine is doing: the load average is printed.

    python benchmarks/zoo.py [--config tiny|smoke] [--run-dir runs/zoo-bench] [--only ae,vae] [key=value ...]

Figures go to benchmarks/results/zoo.json with the `tiny` config only (`smoke` is a
quick check of the script and saves nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import fmt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from multimodal.zoo.registry import RECIPES  # noqa: E402
from pipeline.execution import run_stages  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.presets import resolve_configs  # noqa: E402
from pipeline.runner import make_plan  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets the whole table
ACCURACY_KEYS = ("accuracy", "class_accuracy", "judge_accuracy", "domain_accuracy")


def fid_of(metrics: dict) -> float | None:
    """Return the recipe's FID-like distance: `fid_like`, else the best of its `fid_like_*` figures."""
    if isinstance(metrics.get("fid_like"), (int, float)):
        return metrics["fid_like"]
    values = [v for k, v in metrics.items() if k.startswith("fid_like") and isinstance(v, (int, float))]
    return min(values) if values else None


def row_of(name: str, manifest: dict) -> dict:
    """Return the figures of one recipe from its stage's manifest."""
    metrics = manifest.get("metrics", {})
    recipe = RECIPES[name]
    accuracy = next((metrics[k] for k in ACCURACY_KEYS if isinstance(metrics.get(k), (int, float))), None)
    return {
        "recipe": name,
        "family": recipe.family,
        "status": manifest.get("status"),
        "test_bits_per_dim": metrics.get("test_bits_per_dim"),
        "fid_like": fid_of(metrics),
        "fid_floor": metrics.get("fid_floor"),
        "accuracy": accuracy,
        "train_s": metrics.get("train_s"),
        "wall_s": round(manifest.get("wall_time_s", 0.0), 1),
        "key_metrics": {k: metrics[k] for k in recipe.key_metrics if k in metrics},
    }


def main() -> None:
    """Train (or reuse) every zoo recipe, print the table, save the figures (tiny config)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="named config (default: %(default)s; smoke: seconds)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/zoo-bench-<config>)")
    parser.add_argument("--only", default="", help="comma-separated recipes (default: all registered)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; recipes: {', '.join(RECIPES)}")
    run_dir = Path(args.run_dir or f"runs/zoo-bench-{args.config}")
    configs = resolve_configs(args.config, args.overrides)
    console.print(f"load average at start: {os.getloadavg()[0]:.1f} (cpus {os.cpu_count()}), "
                  f"threads {configs['run'].threads}; run dir {run_dir}")
    rows = []
    for name in names:
        stages = ["t2i_data", RECIPES[name].stage]
        todo = [p.name for p in make_plan(run_dir, configs, stages) if not p.cached]
        started = time.time()
        if todo:
            run_stages(run_dir, configs, todo)
        stage_dir = run_dir / RECIPES[name].stage
        manifest = read_manifest(stage_dir) if (stage_dir / "manifest.json").is_file() else {"status": "failed"}
        rows.append(row_of(name, manifest))
        console.print(f"{name}: {rows[-1]['status']} ({time.time() - started:.0f} s this run)")

    table = Table(title=f"model zoo ({args.config} config, test split of the t2i caption set)")
    for col in ("recipe", "family", "bits/dim", "FID-like (floor)", "judge acc.", "train s", "wall s", "key metrics"):
        table.add_column(col)
    for r in rows:
        fid = "–" if r["fid_like"] is None else f"{r['fid_like']:.1f} ({fmt(r['fid_floor'])})"
        table.add_row(r["recipe"], r["family"], fmt(r["test_bits_per_dim"]), fid, fmt(r["accuracy"]),
                      fmt(r["train_s"]), fmt(r["wall_s"]),
                      ", ".join(f"{k}={fmt(v)}" for k, v in r["key_metrics"].items()), end_section=False)
    console.print(table)
    console.print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.config == "tiny" and not args.overrides and not args.only:
        from record import save

        save("zoo", {"config": args.config, "recipes": rows})
    else:
        console.print("(not saved: only the full `tiny` run of every recipe writes benchmarks/results/zoo.json)")


if __name__ == "__main__":
    main()
