"""Curate throughput: aigc's curate stage vs. datatrove doing identical work, configured from one table.

The standard chain: ftfy, the Gopher repetition, Gopher quality, C4 and FineWeb
rules, exact dedup (aigc) and fuzzy dedup (MinHash on word 5-grams, 14 bands x
8 rows). Every threshold and MinHash parameter of both sides comes from the
table in `curation_work.py` (printed, and saved with the figures); words are
whitespace tokens on both sides. Run on one generated corpus (`curation.synthetic`:
80-600-word documents, 10% planted near-duplicates, 5% junk), in one run:

1. aigc: the real `curate` stage (execute_stage) with its default executor on
   one machine: `workers` forked processes (curation.process_executor).
2. aigc on Ray: the same stage with `curate.executor=ray` (a fresh local Ray).
3. plain: the same Curator stages one after another in this process.
4. datatrove 0.10.1: its own filters and 4-stage MinHash, in its own venv (it
   needs numpy>=2; see benchmarks/datatrove_chain.py), with as many worker
   processes. Skipped when that venv is absent.

Reports documents/s, ratios, fuzzy-dedup recall/precision on the planted
near-duplicates (of those that passed the filters), documents kept, how far the
kept sets agree with datatrove's (Jaccard of the id sets), and peak memory
(summed RSS of the process and its children, sampled every 0.2 s). The machine
is shared: compare figures within one run.

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
from curation.synthetic import SyntheticCorpus, dedup_scores, generate
from pipeline.presets import resolve_configs
from pipeline.runner import configs_to_json, execute_stage
from curation_work import aigc_overrides, rows_for_display
from record import PeakMemory, save

CHAIN_OVERRIDES = aigc_overrides()  # the standard chain, as the shared table configures it


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


def run_aigc(input_dir: Path, run_dir: Path, cpus: int, executor: str) -> dict:
    """Run the curate stage through the runner; return seconds, peak memory, and ids after filters / at the end."""
    configs = resolve_configs("tiny", CHAIN_OVERRIDES + [f"curate.inputs={input_dir}", f"curate.ray_cpus={cpus}",
                                                         f"curate.workers={cpus}", f"curate.executor={executor}"])
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


def run_datatrove(python: str, input_dir: Path, work_dir: Path, workers: int) -> dict:
    """Run benchmarks/datatrove_chain.py with `python` (settings from the shared table); return its summary plus peak memory."""
    cmd = [python, str(Path(__file__).with_name("datatrove_chain.py")), str(input_dir), str(work_dir),
           "--workers", str(workers), "--words", "whitespace"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    with PeakMemory(proc.pid) as memory:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"datatrove chain failed ({proc.returncode}): {' '.join(cmd)}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - start
    return {**summary, "seconds": seconds, "inner_seconds": summary["seconds"], "peak_bytes": memory.peak}


def jaccard(a: list[str], b: list[str]) -> float:
    """Return |A ∩ B| / |A ∪ B| of two id lists as sets."""
    a_set, b_set = set(a), set(b)
    return round(len(a_set & b_set) / max(len(a_set | b_set), 1), 4)


def print_work_table() -> None:
    """Print the table configuring both sides."""
    table = Table(title="identical work: one table configures both sides (benchmarks/curation_work.py)")
    for col in ("setting", "value", "aigc", "datatrove"):
        table.add_column(col)
    for row in rows_for_display():
        table.add_row(*row)
    Console().print(table)


def report(results: dict, corpus: SyntheticCorpus, n_docs: int) -> dict:
    """Print the comparison table; return the figures as a dict."""
    figures: dict = {"docs": n_docs, "work": [list(r) for r in rows_for_display()]}
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
        if "datatrove" in results and name != "datatrove":
            row["agreement_after_filters"] = jaccard(r["after_filters"], results["datatrove"]["after_filters"])
            row["agreement_final"] = jaccard(r["final"], results["datatrove"]["final"])
        figures[name] = row
        table.add_row(name, str(row["seconds"]), str(row["docs_per_s"]), str(row["after_filters"]), str(row["final"]),
                      str(row["dedup_recall"]), str(row["dedup_precision"]),
                      f"{row['peak_gib']} GiB" if row["peak_gib"] is not None else "-")
    Console().print(table)
    for other in ("aigc_ray", "plain", "datatrove"):
        if other in figures:
            figures[f"speedup_vs_{other}"] = round(figures["aigc"]["docs_per_s"] / figures[other]["docs_per_s"], 2)
            print(f"aigc / {other}: {figures[f'speedup_vs_{other}']}x documents/s")
    if "datatrove" in figures:
        figures["ray_speedup_vs_datatrove"] = round(figures["aigc_ray"]["docs_per_s"] / figures["datatrove"]["docs_per_s"], 2)
        print(f"aigc on Ray / datatrove: {figures['ray_speedup_vs_datatrove']}x documents/s; kept sets agree "
              f"{figures['aigc']['agreement_final']} (Jaccard of final ids)")
    return figures


def main() -> None:
    """Generate the corpus, run the chains, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents to generate")
    parser.add_argument("--shards", type=int, default=8, help="JSONL files the corpus is written to")
    parser.add_argument("--cpus", type=int, default=2, help="aigc worker processes = CPUs of its local Ray = datatrove workers")
    parser.add_argument("--datatrove-python", default=".venv-datatrove/bin/python",
                        help="python of a venv with datatrove 0.10.1 (see benchmarks/datatrove_chain.py)")
    parser.add_argument("--no-plain", action="store_true", help="skip the single-process run")
    parser.add_argument("--json", help="write the figures here instead of benchmarks/results/curate_throughput.json")
    args = parser.parse_args()

    corpus = generate(args.docs, seed=0)
    print_work_table()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        input_dir = Path(tmp) / "input"
        write_corpus(corpus, input_dir, args.shards)
        print(f"corpus: {args.docs} documents, {sum(f.stat().st_size for f in input_dir.iterdir()) / 1e6:.1f} MB "
              f"in {args.shards} files", flush=True)
        results["aigc"] = run_aigc(input_dir, Path(tmp) / "run", args.cpus, "processes")
        results["aigc_ray"] = run_aigc(input_dir, Path(tmp) / "run_ray", args.cpus, "ray")
        if not args.no_plain:
            results["plain"] = run_plain(input_dir)
        if Path(args.datatrove_python).exists():
            work = Path(tmp) / "datatrove"
            results["datatrove"] = run_datatrove(args.datatrove_python, input_dir, work, args.cpus)
        else:
            print(f"datatrove skipped: no {args.datatrove_python} (see benchmarks/datatrove_chain.py)", file=sys.stderr)
    figures = report(results, corpus, args.docs)
    save("curate_throughput", figures, args.json)


if __name__ == "__main__":
    main()
