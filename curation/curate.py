"""The `curate` stage: input text -> cleaned, filtered, redacted, deduplicated corpus shards.

Runs the NeMo Curator pipeline of `curation.curator_stages` on `workers` local
processes (`curation.process_executor`; the default on one machine) or with
`RayDataExecutor` on a fresh local Ray or the cluster at `ray_address`:
read, clean, language id, Gopher/C4/FineWeb rules, decontamination, quality
classifier, PII redaction and dedup signatures, all per batch on the
workers. Then, on the driver, the global steps over the whole corpus: exact
dedup, fuzzy dedup (MinHash LSH clusters) and the `max_docs` cap.

On a Ray cluster the same pipeline runs on all its nodes: set
`curate.ray_address` to the cluster (`auto` inside a Ray job). On Slurm,
a cluster profile with `curate: {nodes: N, launcher: ray}` starts Ray across
the allocation (`ray start --head` on the first node, `ray start --address`
on the others; see pipeline.slurm_executor) and runs the stage on the head
with `curate.ray_address=auto`. The driver steps keep the corpus' MinHash
signatures in driver memory (bands x rows x 4 bytes per document).

Writes, under the stage directory:

    corpus/shard-NNNNN.jsonl   {"id", "text", "source", "language"} in input order ("source" = file:line)
                               (.parquet with output_format=parquet)
    rejects/rejects.jsonl      malformed input records: {"file", "line", "reason", "detail", "raw"}
    rejects/filtered.jsonl     documents a filter removed: {"id", "step", "reason", "source"} (reason: the
                               first rule failed, e.g. "word_count", "language_fr")
    rejects/duplicates.jsonl   exact copies removed: {"id", "duplicate_of"}
    rejects/near_duplicates.jsonl  fuzzy duplicates removed: {"id", "duplicate_of", "jaccard"}
    stats.json                 documents in/out, reasons and counts of every step
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from nemo_curator.tasks import DocumentBatch
from rich.console import Console
from rich.table import Table

from curation import heuristics, langid, pii, quality_classifier
from curation.corpus import FORMATS
from curation.curator_stages import (
    DOC_COLUMNS,
    ExactDedupStage,
    FuzzyDedupStage,
    build_pipeline,
    step_names,
)
from curation.decontam import eval_ngrams
from curation.readers import expand_inputs, iter_documents
from curation.shipped_data import shipped_inputs
from curation.stages import CurateConfig
from pipeline.stage import StageContext, StageResult

OBJECT_STORE_BYTES = 512 * 1024**2
RAY_START_ATTEMPTS = 3
OUTPUT_COLUMNS = ["id", "text", "source", "language", "quality_score"]


class TooManyRejectsError(RuntimeError):
    """More malformed input records than `max_rejects_fraction` allows."""


@contextlib.contextmanager
def ray_cluster(address: str, num_cpus: int) -> Iterator[None]:
    """Join the Ray cluster at `address` or start a fresh local Ray (no dashboard); shut it down on exit.

    Yields nothing. Auth is the environment's: the Slurm ray launcher exports its
    job's token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH). A local Ray gets a
    token of this process (`give_local_ray_a_token`).
    """
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        give_local_ray_a_token()
        start_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def give_local_ray_a_token() -> None:
    """Put a random token in RAY_AUTH_TOKEN unless RAY_AUTH_MODE or a token is already set; returns None.

    A local Ray is not private to this machine: Ray advertises the node's
    address, never 127.0.0.1, and its servers listen on every interface. With
    RAY_AUTH_MODE unset, `ray.init` of a new local Ray turns token auth on; the
    token then lives only in the environment of this process and its Ray
    processes, not in ~/.ray/auth_token. The same token serves every later
    local Ray of this process (Ray caches it).
    """
    if not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


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


def check_config(cfg: CurateConfig) -> None:
    """Raise ValueError for settings that name unknown things (before Ray starts)."""
    unknown_groups = sorted(set(cfg.rule_groups) - set(heuristics.GROUPS))
    if unknown_groups:
        raise ValueError(f"unknown curate.rule_groups {unknown_groups}; choose from {', '.join(heuristics.GROUPS)}")
    unknown_rules = sorted(set(cfg.skip_rules) - set(heuristics.rule_names()))
    if unknown_rules:
        raise ValueError(f"unknown curate.skip_rules {unknown_rules}; rules: {', '.join(heuristics.rule_names())}")
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"curate.executor must be one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    if cfg.executor == "processes" and cfg.ray_address:
        raise ValueError("curate.executor=processes runs on this machine only: unset curate.ray_address or use ray")
    if cfg.workers < 1:
        raise ValueError(f"curate.workers must be >= 1, got {cfg.workers}")
    if cfg.output_format not in FORMATS:
        raise ValueError(f"curate.output_format must be jsonl or parquet, got {cfg.output_format!r}")
    if bool(cfg.quality_good) != bool(cfg.quality_bad):
        raise ValueError("the quality classifier needs both curate.quality_good and curate.quality_bad")
    pii.check_kinds(cfg.pii_kinds)
    langid.check_languages(cfg.languages)


def train_quality_model(cfg: CurateConfig) -> quality_classifier.QualityModel:
    """Return the quality classifier trained on the configured good and bad files."""
    good = list(iter_documents(cfg.quality_good, cfg.text_field))
    bad = list(iter_documents(cfg.quality_bad, cfg.text_field))
    return quality_classifier.train(good, bad, ngram=cfg.quality_ngram)


EXECUTORS = ("auto", "ray", "processes")


def uses_ray(cfg: CurateConfig) -> bool:
    """Return True when the pipeline runs on Ray: executor `ray`, or `auto` with a cluster address."""
    return cfg.executor == "ray" or (cfg.executor == "auto" and bool(cfg.ray_address))


def run_curator(pipeline, cfg: CurateConfig) -> list:
    """Return the DocumentBatch tasks of the Curator `pipeline`, run on Ray or on local worker processes."""
    if not uses_ray(cfg):
        from curation.process_executor import ProcessPoolExecutor

        return pipeline.run(executor=ProcessPoolExecutor(cfg.workers))
    from nemo_curator.backends.ray_data import RayDataExecutor

    with ray_cluster(cfg.ray_address, cfg.ray_cpus):
        return pipeline.run(executor=RayDataExecutor())


def filtered_documents(tasks: list) -> list[dict]:
    """Return {"id", "step", "reason", "source"} of every document a filter step removed, in input order."""
    records = sorted((r for t in tasks for r in t._metadata.get("filtered", [])), key=lambda r: r["order"])
    return [{k: v for k, v in r.items() if k != "order"} for r in records]


def merge_tasks(tasks: list) -> tuple[pd.DataFrame, list[dict], int]:
    """Return (all documents in input order, all rejects, input records) of the pipeline output."""
    frames = [t.to_pandas() for t in tasks if t.num_items]
    docs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DOC_COLUMNS)
    docs = docs.sort_values(["file_index", "line"], kind="stable").reset_index(drop=True)
    rejects = sorted(
        (r for t in tasks for r in t._metadata.get("rejects", [])), key=lambda r: (r["file"], r["line"])
    )
    lines = sum(t._metadata.get("lines", 0) for t in tasks)
    return docs, rejects, lines


def sum_steps(tasks: list, names: list[str]) -> dict[str, dict]:
    """Return each named step's statistics summed over the tasks' metadata."""
    totals = {
        n: {"docs_in": 0, "docs_out": 0, "reasons": collections.Counter(), "counts": collections.Counter()}
        for n in names
    }
    for task in tasks:
        for name, step in task._metadata.get("steps", {}).items():
            if name in totals:
                totals[name]["docs_in"] += step["docs_in"]
                totals[name]["docs_out"] += step["docs_out"]
                totals[name]["reasons"].update(step["reasons"])
                totals[name]["counts"].update(step["counts"])
    return {n: {**t, "reasons": dict(t["reasons"]), "counts": dict(t["counts"])} for n, t in totals.items()}


def global_dedup(docs: pd.DataFrame, cfg: CurateConfig) -> DocumentBatch:
    """Return the corpus (in input order) after exact dedup and, when configured, fuzzy dedup.

    Both are Curator stages run here on the driver over the whole corpus as one
    batch; their steps and removed ids are in the result's metadata.
    """
    deduped = ExactDedupStage().process(DocumentBatch(dataset_name="curate", data=docs))
    if cfg.fuzzy_dedup:
        fuzzy = FuzzyDedupStage(bands=cfg.minhash_bands, rows=cfg.minhash_rows, threshold=cfg.minhash_threshold)
        deduped = fuzzy.process(deduped)
    return deduped


def check_rejects(rejects: int, lines: int, max_fraction: float, where: Path) -> None:
    """Raise TooManyRejectsError when more than `max_fraction` of the input records were rejected."""
    if rejects > max_fraction * lines:
        raise TooManyRejectsError(
            f"{rejects} of {lines} input records ({rejects / lines:.1%}) are malformed, more than "
            f"curate.max_rejects_fraction={max_fraction}; see {where}"
        )


def cap_docs(docs: pd.DataFrame, max_docs: int, seed: int) -> pd.DataFrame:
    """Return at most `max_docs` documents (0 = all): a seeded random sample, input order kept."""
    if max_docs <= 0 or len(docs) <= max_docs:
        return docs
    keep = sorted(random.Random(seed).sample(range(len(docs)), max_docs))
    return docs.iloc[keep].reset_index(drop=True)


def json_line(record: dict) -> str:
    """Return `record` as one JSON line, not ASCII-escaped unless it holds a lone surrogate.

    A string UTF-8 cannot encode (a lone surrogate, e.g. from a file name that is
    not UTF-8) is written `\\udXXX`-escaped: the line stays valid JSON and UTF-8.
    """
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write `records` to `path`, one JSON object per line (UTF-8; see `json_line`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json_line(r) for r in records)


def _unencodable(value) -> bool:
    """Return True for a string UTF-8 cannot encode (a lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def split_unwritable(docs: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """Return (the documents a corpus shard can hold, a reject for each other one).

    A document whose output column holds a string UTF-8 cannot encode (a lone
    surrogate) cannot be written as JSONL or Parquet; it is rejected
    (`unwritable`, naming the column) instead of failing the whole stage.
    """
    columns = [c for c in OUTPUT_COLUMNS if c in docs]
    bad = pd.Series(False, index=docs.index)
    for c in columns:
        bad |= docs[c].map(_unencodable).astype(bool)
    rejects = []
    for row in docs[bad].to_dict("records"):
        column = next(c for c in columns if _unencodable(row[c]))
        source = str(row.get("source", ""))
        file, _, line = source.rpartition(":")
        rejects.append({
            "file": file or source, "line": int(line) if line.isdigit() else 0, "reason": "unwritable",
            "detail": f"column {column!r} has a character UTF-8 cannot encode (lone surrogate)",
            "raw": str(row["text"])[:300].encode("utf-8", "replace").decode("utf-8"),
        })
    return docs[~bad.to_numpy()].reset_index(drop=True), rejects


def write_shards(corpus_dir: Path, docs: pd.DataFrame, docs_per_shard: int, output_format: str = "jsonl") -> list[Path]:
    """Write the documents' output columns as `shard-NNNNN.<format>` files; return their paths."""
    columns = [c for c in OUTPUT_COLUMNS if c in docs]  # split_unwritable first: these must encode as UTF-8
    corpus_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, max(len(docs), 1), docs_per_shard)):
        part = docs[columns].iloc[start : start + docs_per_shard]
        paths.append(corpus_dir / f"shard-{n:05d}.{output_format}")
        if output_format == "parquet":
            part.to_parquet(paths[-1], index=False)
        else:
            write_jsonl(paths[-1], part.to_dict("records"))
    return paths


def build_stats(files: list[Path], lines: int, rejects: list[dict], steps: list[dict], docs_out: pd.DataFrame) -> dict:
    """Return stats.json: every step with docs in/out, why documents left, and what it counted."""
    return {
        "inputs": [str(f) for f in files],
        "input_lines": lines,
        "rejects": len(rejects),
        "rejects_fraction": round(len(rejects) / max(lines, 1), 4),
        "docs_out": len(docs_out),
        "chars_out": int(docs_out["text"].str.len().sum()) if len(docs_out) else 0,
        "steps": steps,
    }


def print_stats(stats: dict) -> None:
    """Print the per-step table of the curate stage."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs: room for the reasons
    table = Table(title=f"curate: {stats['docs_out']} documents, {stats['chars_out']:,} characters")
    for col in ("step", "docs in", "docs out", "removed", "why", "counts"):
        table.add_column(col, justify="left" if col in ("step", "why", "counts") else "right", no_wrap=col == "step")
    for s in stats["steps"]:
        why = "\n".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1]) if v)
        counts = "\n".join(f"{k} {v}" for k, v in s.get("counts", {}).items() if v)
        table.add_row(s["step"], str(s["docs_in"]), str(s["docs_out"]), str(s["docs_in"] - s["docs_out"]), why, counts)
    console.print(table)


def stage_metrics(stats: dict) -> dict:
    """Return the stage's metrics: totals, removals per step and per rule, and the steps' counts."""
    metrics = {k: stats[k] for k in ("input_lines", "rejects", "rejects_fraction", "docs_out", "chars_out")}
    for step in stats["steps"][1:]:
        metrics[f"removed_{step['step']}"] = step["docs_in"] - step["docs_out"]
        rules = heuristics.GROUPS.get(step["step"], ())
        metrics |= {f"removed_{r.name}": step["reasons"].get(r.name, 0) for r in rules}
        metrics |= {f"{step['step']}_{k}": v for k, v in step.get("counts", {}).items()}
    return metrics


def run(ctx: StageContext) -> StageResult:
    """Curate the configured inputs into `corpus/`, `rejects/` and `stats.json` under ctx.out_dir."""
    cfg: CurateConfig = ctx.config
    check_config(cfg)
    files = expand_inputs(cfg.inputs or shipped_inputs())
    eval_hashes = eval_ngrams(cfg.decontam_paths, cfg.decontam_ngram, cfg.text_field) if cfg.decontam_paths else None
    model = train_quality_model(cfg) if cfg.quality_good else None
    pipeline = build_pipeline(files, cfg, eval_hashes, model)
    tasks = run_curator(pipeline, cfg)
    docs, rejects, lines = merge_tasks(tasks)
    totals = sum_steps(tasks, step_names(pipeline))

    out = Path(ctx.out_dir)
    write_jsonl(out / "rejects" / "rejects.jsonl", rejects)
    write_jsonl(out / "rejects" / "filtered.jsonl", filtered_documents(tasks))
    check_rejects(len(rejects), lines, cfg.max_rejects_fraction, out / "rejects" / "rejects.jsonl")
    deduped = global_dedup(docs, cfg)
    write_jsonl(out / "rejects" / "duplicates.jsonl", deduped._metadata["duplicates"])
    if cfg.fuzzy_dedup:
        write_jsonl(out / "rejects" / "near_duplicates.jsonl", deduped._metadata["near_duplicates"])
    kept = deduped.to_pandas()
    final = cap_docs(kept, cfg.max_docs, ctx.seed)
    capped = len(final)
    final, unwritable = split_unwritable(final)
    if unwritable:
        rejects = rejects + unwritable
        write_jsonl(out / "rejects" / "rejects.jsonl", rejects)

    steps = [{"step": n, **totals[n]} for n in totals]
    steps += [{"step": n, **s} for n, s in deduped._metadata["steps"].items() if n in ("exact_dedup", "fuzzy_dedup")]
    steps.append({"step": "max_docs", "docs_in": len(kept), "docs_out": capped,
                  "reasons": {"over_max_docs": len(kept) - capped} if len(kept) > capped else {}, "counts": {}})
    steps.append({"step": "write", "docs_in": capped, "docs_out": len(final),
                  "reasons": {"unwritable": len(unwritable)} if unwritable else {}, "counts": {}})
    stats = build_stats(files, lines, rejects, steps, final)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print_stats(stats)
    if final.empty:
        raise RuntimeError(f"curate kept no documents out of {lines} input records; see {out / 'stats.json'}")
    write_shards(out / "corpus", final, cfg.docs_per_shard, cfg.output_format)
    return StageResult(
        outputs={"corpus": "corpus", "rejects": "rejects", "stats": "stats.json"}, metrics=stage_metrics(stats)
    )
