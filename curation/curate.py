"""The `curate` stage: input text -> cleaned, filtered, deduplicated JSONL shards.

Runs the NeMo Curator pipeline of `curation.curator_stages` with
`RayDataExecutor` on a fresh local Ray (or the cluster at `ray_address`), then,
on the driver, exact dedup over the whole corpus and the `max_docs` cap.
Writes, under the stage directory:

    corpus/shard-NNNNN.jsonl   {"id", "text", "source"} in input order ("source" = file:line)
    rejects/rejects.jsonl      malformed input lines: {"file", "line", "reason", "detail", "raw"}
    rejects/duplicates.jsonl   removed copies: {"id", "duplicate_of"}
    stats.json                 documents in/out and reasons of every step
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from nemo_curator.tasks import DocumentBatch
from rich.console import Console
from rich.table import Table

from curation.curator_stages import (
    DEDUP_STEP,
    DOC_COLUMNS,
    NORMALIZE_STEP,
    READ_STEP,
    ExactDedupStage,
    build_pipeline,
    filter_names,
)
from curation.readers import expand_inputs
from curation.shipped_data import shipped_inputs
from curation.stages import CurateConfig
from pipeline.stage import StageContext, StageResult

OBJECT_STORE_BYTES = 512 * 1024**2
RAY_START_ATTEMPTS = 3


class TooManyRejectsError(RuntimeError):
    """More malformed input lines than `max_rejects_fraction` allows."""


@contextlib.contextmanager
def ray_cluster(address: str, num_cpus: int) -> Iterator[None]:
    """Start a fresh local Ray (no dashboard, no auth) or join `address`; shut it down on exit."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def start_local_ray(num_cpus: int) -> None:
    """Start a fresh local Ray, retrying when it does not come up in time.

    Ray's raylet gives its dashboard agent a fixed 15 s to start; on a loaded
    2-core machine the agent's imports can take longer and the node start fails.
    The processes of a failed start are ours: they are killed before the retry.
    """
    import psutil
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=False,
            )
            return
        except Exception as exc:  # Ray raises a bare Exception when its node times out starting
            ray.shutdown()
            leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for p in leftovers:
                p.kill()
            psutil.wait_procs(leftovers, timeout=10)
            if attempt == RAY_START_ATTEMPTS:
                raise RuntimeError(f"local Ray did not start in {attempt} attempts: {exc}") from exc
            print(f"[curate] local Ray did not start ({exc}); retrying", flush=True)


def run_curator(cfg: CurateConfig, files: list[Path]) -> list:
    """Return the DocumentBatch tasks of the Curator pipeline run on Ray over `files`."""
    from nemo_curator.backends.ray_data import RayDataExecutor

    pipeline = build_pipeline(files, cfg.text_field, cfg.id_field, cfg.min_words, cfg.max_symbol_to_word_ratio)
    with ray_cluster(cfg.ray_address, cfg.ray_cpus):
        return pipeline.run(executor=RayDataExecutor())


def step_counts(tasks: list, names: list[str]) -> dict[str, int]:
    """Return documents received by each named Curator stage, summed over the output tasks."""
    counts = dict.fromkeys(names, 0)
    for task in tasks:
        for perf in task._stage_perf:
            if perf.stage_name in counts:
                counts[perf.stage_name] += int(perf.num_items_processed)
    return counts


def merge_tasks(tasks: list) -> tuple[pd.DataFrame, list[dict], int]:
    """Return (all documents in input order, all rejects, non-blank input lines) of the pipeline output."""
    frames = [t.to_pandas() for t in tasks]
    docs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DOC_COLUMNS)
    docs = docs.sort_values(["file_index", "line"], kind="stable").reset_index(drop=True)
    rejects = sorted(
        (r for t in tasks for r in t._metadata.get("rejects", [])), key=lambda r: (r["file"], r["line"])
    )
    lines = sum(t._metadata.get("lines", 0) for t in tasks)
    return docs, rejects, lines


def cap_docs(docs: pd.DataFrame, max_docs: int, seed: int) -> pd.DataFrame:
    """Return at most `max_docs` documents (0 = all): a seeded random sample, input order kept."""
    if max_docs <= 0 or len(docs) <= max_docs:
        return docs
    keep = sorted(random.Random(seed).sample(range(len(docs)), max_docs))
    return docs.iloc[keep].reset_index(drop=True)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write `records` to `path`, one JSON object per line (UTF-8, not ASCII-escaped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_shards(corpus_dir: Path, docs: pd.DataFrame, docs_per_shard: int) -> list[Path]:
    """Write documents as `shard-NNNNN.jsonl` files of {"id", "text", "source"}; return their paths."""
    records = docs[["id", "text", "source"]].to_dict("records")
    paths = []
    for n, start in enumerate(range(0, max(len(records), 1), docs_per_shard)):
        paths.append(corpus_dir / f"shard-{n:05d}.jsonl")
        write_jsonl(paths[-1], records[start : start + docs_per_shard])
    return paths


def build_stats(
    files: list[Path],
    lines: int,
    rejects: list[dict],
    filter_in: dict[str, int],
    after_filters: int,
    after_dedup: int,
    docs_out: pd.DataFrame,
) -> dict:
    """Return stats.json: every step with docs in/out and why documents left."""
    read_out = lines - len(rejects)
    names = list(filter_in)
    steps = [
        {"step": READ_STEP, "docs_in": lines, "docs_out": read_out,
         "reasons": dict(collections.Counter(r["reason"] for r in rejects))},
        {"step": NORMALIZE_STEP, "docs_in": read_out, "docs_out": read_out, "reasons": {}},
    ]
    for name, nxt in zip(names, names[1:] + [None]):
        out = filter_in[nxt] if nxt else after_filters
        steps.append({"step": name, "docs_in": filter_in[name], "docs_out": out,
                      "reasons": {name: filter_in[name] - out}})
    steps.append({"step": DEDUP_STEP, "docs_in": after_filters, "docs_out": after_dedup,
                  "reasons": {"duplicate": after_filters - after_dedup}})
    steps.append({"step": "max_docs", "docs_in": after_dedup, "docs_out": len(docs_out),
                  "reasons": {"over_max_docs": after_dedup - len(docs_out)}})
    return {
        "inputs": [str(f) for f in files],
        "input_lines": lines,
        "rejects": len(rejects),
        "rejects_fraction": round(len(rejects) / max(lines, 1), 4),
        "docs_out": len(docs_out),
        "chars_out": int(docs_out["text"].str.len().sum()),
        "steps": steps,
    }


def print_stats(stats: dict) -> None:
    """Print the per-step table of the curate stage."""
    table = Table(title=f"curate: {stats['docs_out']} documents, {stats['chars_out']:,} characters")
    for col in ("step", "docs in", "docs out", "removed", "why"):
        table.add_column(col, justify="left" if col in ("step", "why") else "right")
    for s in stats["steps"]:
        why = ", ".join(f"{k} {v}" for k, v in s["reasons"].items() if v and k != s["step"])
        table.add_row(s["step"], str(s["docs_in"]), str(s["docs_out"]), str(s["docs_in"] - s["docs_out"]), why)
    Console().print(table)


def run(ctx: StageContext) -> StageResult:
    """Curate the configured inputs into `corpus/`, `rejects/` and `stats.json` under ctx.out_dir."""
    cfg: CurateConfig = ctx.config
    files = expand_inputs(cfg.inputs or shipped_inputs())
    names = filter_names(cfg.min_words, cfg.max_symbol_to_word_ratio)
    tasks = run_curator(cfg, files)
    docs, rejects, lines = merge_tasks(tasks)
    filter_in = step_counts(tasks, names)

    out = Path(ctx.out_dir)
    write_jsonl(out / "rejects" / "rejects.jsonl", rejects)
    if len(rejects) > cfg.max_rejects_fraction * lines:
        raise TooManyRejectsError(
            f"{len(rejects)} of {lines} input lines ({len(rejects) / lines:.1%}) are malformed, more than "
            f"curate.max_rejects_fraction={cfg.max_rejects_fraction}; see {out / 'rejects' / 'rejects.jsonl'}"
        )
    deduped = ExactDedupStage().process(DocumentBatch(dataset_name="curate", data=docs))
    write_jsonl(out / "rejects" / "duplicates.jsonl", deduped._metadata["duplicates"])
    final = cap_docs(deduped.to_pandas(), cfg.max_docs, ctx.seed)
    stats = build_stats(files, lines, rejects, filter_in, len(docs), deduped.num_items, final)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print_stats(stats)
    if final.empty:
        raise RuntimeError(f"curate kept no documents out of {lines} input lines; see {out / 'stats.json'}")
    write_shards(out / "corpus", final, cfg.docs_per_shard)
    metrics = {
        "input_lines": lines,
        "rejects": len(rejects),
        "rejects_fraction": stats["rejects_fraction"],
        "docs_out": stats["docs_out"],
        "chars_out": stats["chars_out"],
    }
    metrics |= {f"removed_{s['step']}": s["docs_in"] - s["docs_out"] for s in stats["steps"][2:]}
    return StageResult(outputs={"corpus": "corpus", "rejects": "rejects", "stats": "stats.json"}, metrics=metrics)
