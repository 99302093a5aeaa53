"""Curate throughput: the standard chain on Curator + local Ray vs. the same chain in datatrove.

The standard chain: ftfy + markup + whitespace cleaning, the Gopher
repetition, Gopher quality, C4 and FineWeb rules with every rule on at its
paper's default, exact dedup, fuzzy dedup (MinHash on word 5-grams, 14 bands
x 8 rows). Run three ways on one generated corpus (`curation.synthetic`:
80-600-word documents, 10% planted near-duplicates, 5% junk), in one run:

1. aigc: the real `curate` stage (execute_stage) on a fresh local Ray.
2. plain: the same stages one after another in this process (no Ray).
3. datatrove 0.10.1: its own filters and 4-stage MinHash with the same
   parameters, in its own venv (it needs numpy>=2; see benchmarks/datatrove_chain.py),
   with the same number of worker processes. Skipped when that venv is absent.

Reports documents/s, ratios, fuzzy-dedup recall/precision on the planted
near-duplicates (of those that passed the filters), documents kept, and peak
memory (summed RSS of the process and its children, sampled every 0.2 s).
The machine is shared: compare figures within one run.

    python benchmarks/curate_throughput.py --docs 20000 --datatrove-python .venv-datatrove/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from curation.corpus import read_corpus
from curation.curate import global_dedup, merge_tasks
from curation.curator_stages import build_pipeline, run_locally
from curation.readers import expand_inputs
from curation.stages import CurateConfig
from curation.synthetic import SyntheticCorpus, dedup_scores, generate
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from record import PeakMemory, save

CHAIN_OVERRIDES = [  # the standard chain: no language id, PII, decontamination or classifier; every rule on
    "curate.languages=",
    "curate.pii_kinds=",
    "curate.skip_rules=",
    "curate.max_docs=0",
    "curate.docs_per_shard=1000000",
]


def write_corpus(corpus: SyntheticCorpus, out_dir: Path, shards: int) -> None:
    """Write the corpus records, in order, into `shards` JSONL files of consecutive records."""
    out_dir.mkdir(parents=True)
    per_shard = -(-len(corpus.records) // shards)
    for k in range(shards):
        records = corpus.records[k * per_shard : (k + 1) * per_shard]
        with open(out_dir / f"part-{k:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def jsonl_ids(path: Path) -> list[str]:
    """Return the ids of a JSONL file."""
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_aigc(input_dir: Path, run_dir: Path, cpus: int) -> dict:
    """Run the curate stage through the runner; return seconds, peak memory, and ids after filters / at the end."""
    configs = resolve_configs("tiny", CHAIN_OVERRIDES + [f"curate.inputs={input_dir}", f"curate.ray_cpus={cpus}"])
    start = time.perf_counter()
    with PeakMemory(psutil.Process().pid) as memory:
        manifest = execute_stage(str(run_dir), "curate", configs_to_json(configs))
    seconds = time.perf_counter() - start
    out = run_dir / "curate"
    final = [d["id"] for d in read_corpus(out / "corpus")]
    removed = jsonl_ids(out / "rejects" / "duplicates.jsonl") + jsonl_ids(out / "rejects" / "near_duplicates.jsonl")
    return {"seconds": seconds, "peak_bytes": memory.peak, "after_filters": final + removed, "final": final,
            "metrics": manifest["metrics"]}


def run_plain(input_dir: Path) -> dict:
    """Run the same chain's stages in this process without Ray; return seconds and ids."""
    cfg = resolve_configs("tiny", CHAIN_OVERRIDES)["curate"]
    files = expand_inputs([input_dir])
    start = time.perf_counter()
    docs, _, _ = merge_tasks(run_locally(build_pipeline(files, cfg), files))
    final = global_dedup(docs, cfg).to_pandas()["id"].tolist()
    return {"seconds": time.perf_counter() - start, "after_filters": docs["id"].tolist(), "final": final}


def run_datatrove(python: str, input_dir: Path, work_dir: Path, cfg: CurateConfig, workers: int) -> dict:
    """Run benchmarks/datatrove_chain.py with `python`; return its summary plus peak memory."""
    cmd = [python, str(Path(__file__).with_name("datatrove_chain.py")), str(input_dir), str(work_dir),
           "--ngram", str(cfg.minhash_ngram), "--bands", str(cfg.minhash_bands), "--rows", str(cfg.minhash_rows),
           "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakMemory(proc.pid) as memory:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"datatrove chain failed ({proc.returncode}): {' '.join(cmd)}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - start
    return {**summary, "seconds": seconds, "inner_seconds": summary["seconds"], "peak_bytes": memory.peak}


def ray_start_seconds(cpus: int) -> float:
    """Return how long starting and stopping a local Ray takes here (part of every aigc run).

    Measured in a child process: a second Ray session in one process confuses
    Ray Data's metrics actor (KeyError spam) and slows the run after it.
    """
    code = (
        "import time; from curation.curate import ray_cluster; t = time.perf_counter()\n"
        f"with ray_cluster('', {cpus}): pass\n"
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def report(results: dict, corpus: SyntheticCorpus, n_docs: int, ray_s: float) -> dict:
    """Print the comparison table; return the figures as a dict."""
    figures = {"docs": n_docs, "ray_start_stop_s": round(ray_s, 1)}
    table = Table(title=f"curate standard chain on {n_docs:,} generated documents")
    for col in ("run", "seconds", "docs/s", "after filters", "final", "dedup recall", "dedup precision", "peak memory"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in results.items():
        after, final = set(r["after_filters"]), set(r["final"])
        scores = dedup_scores(after - final, after, corpus)
        row = {
            "seconds": round(r["seconds"], 1),
            "docs_per_s": round(n_docs / r["seconds"], 1),
            "after_filters": len(after),
            "final": len(final),
            "dedup_recall": scores["recall"],
            "dedup_precision": scores["precision"],
            "planted_reaching_dedup": scores["planted"],
            "peak_gib": round(r["peak_bytes"] / 2**30, 2) if "peak_bytes" in r else None,
        }
        figures[name] = row
        table.add_row(name, str(row["seconds"]), str(row["docs_per_s"]), str(row["after_filters"]), str(row["final"]),
                      str(row["dedup_recall"]), str(row["dedup_precision"]),
                      f"{row['peak_gib']} GiB" if row["peak_gib"] is not None else "-")
    Console().print(table)
    for other in ("plain", "datatrove"):
        if other in figures:
            figures[f"speedup_vs_{other}"] = round(figures["aigc"]["docs_per_s"] / figures[other]["docs_per_s"], 2)
            print(f"aigc / {other}: {figures[f'speedup_vs_{other}']}x documents/s")
    return figures


def main() -> None:
    """Generate the corpus, run the chains, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents to generate")
    parser.add_argument("--shards", type=int, default=8, help="JSONL files the corpus is written to")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray = datatrove workers")
    parser.add_argument("--datatrove-python", default=".venv-datatrove/bin/python",
                        help="python of a venv with datatrove 0.10.1 (see benchmarks/datatrove_chain.py)")
    parser.add_argument("--no-plain", action="store_true", help="skip the single-process run")
    parser.add_argument("--json", help="write the figures here instead of benchmarks/results/curate_throughput.json")
    args = parser.parse_args()

    corpus = generate(args.docs, seed=0)
    cfg = resolve_configs("tiny", CHAIN_OVERRIDES)["curate"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        input_dir = Path(tmp) / "input"
        write_corpus(corpus, input_dir, args.shards)
        print(f"corpus: {args.docs} documents, {sum(f.stat().st_size for f in input_dir.iterdir()) / 1e6:.1f} MB "
              f"in {args.shards} files", flush=True)
        ray_s = ray_start_seconds(args.cpus)
        results["aigc"] = run_aigc(input_dir, Path(tmp) / "run", args.cpus)
        if not args.no_plain:
            results["plain"] = run_plain(input_dir)
        if Path(args.datatrove_python).exists():
            work = Path(tmp) / "datatrove"
            results["datatrove"] = run_datatrove(args.datatrove_python, input_dir, work, cfg, args.cpus)
        else:
            print(f"datatrove skipped: no {args.datatrove_python} (see benchmarks/datatrove_chain.py)", file=sys.stderr)
    figures = report(results, corpus, args.docs, ray_s)
    save("curate_throughput", figures, args.json)


if __name__ == "__main__":
    main()
