"""The whole chain, cold and cached: `aigc run` as a user runs it, timed per stage.

Runs `aigc run --config CONFIG --run-dir RUN_DIR` in a subprocess into a fresh run
directory (RUN_DIR is removed first unless --keep), sampling the peak summed RSS
of the process tree, then runs it again (every stage cached). Records each
stage's wall time and metrics from its manifest, Triton's answer, both wall
times and the peak memory in benchmarks/results/chain.json.

    python benchmarks/chain.py [--config tiny] [--run-dir runs/tiny] [--keep] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from record import PeakMemory, save


def timed_run(command: list[str]) -> tuple[float, int]:
    """Run the command (output passed through); return its wall seconds and the peak RSS of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    with PeakMemory(process.pid) as memory:
        code = process.wait()
    if code:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
    return time.perf_counter() - started, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--keep", action="store_true", help="keep finished stages of RUN_DIR (not a cold run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not args.keep:
        shutil.rmtree(run_dir)
    command = ["aigc", "run", "--config", args.config, "--run-dir", str(run_dir), *args.overrides]
    cold_s, peak = timed_run(command)
    cached_s, _ = timed_run(command)
    stages = {}
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        record = json.loads(manifest.read_text())
        stages[record["stage"]] = {"wall_s": record["wall_time_s"], "metrics": record["metrics"]}
    answer = json.loads((run_dir / "serve" / "answer.json").read_text())
    save("chain", {"config": args.config, "cold": not args.keep, "overrides": args.overrides,
                   "wall_s": round(cold_s, 1), "cached_wall_s": round(cached_s, 1),
                   "peak_rss_gib": round(peak / 2**30, 2), "stages": stages, "answer": answer})


if __name__ == "__main__":
    main()
