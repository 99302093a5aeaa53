"""Curate throughput: the Curator pipeline on local Ray vs. a plain single-process loop.

Both do the same work on the same input (the shipped corpus replicated
`--copies` times, each copy made distinct so dedup keeps it): read, ftfy + NFC +
whitespace cleanup, the four heuristic filters, exact dedup. Prints documents
per second of each and their ratio, with Ray's start-up time reported apart.

    python benchmarks/curate_throughput.py --copies 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from curation.cleaning import clean_whitespace, dedup_key, heuristic_filters, unicode_normalizer
from curation.curate import merge_tasks, ray_cluster
from curation.curator_stages import ExactDedupStage, build_pipeline
from curation.readers import read_file
from curation.shipped_data import shipped_inputs
from curation.stages import CurateConfig


def replicate_corpus(out_dir: Path, copies: int) -> list[Path]:
    """Write the shipped files `copies` times with distinct ids and texts; return the new files."""
    files = []
    for k in range(copies):
        for src in shipped_inputs():
            dst = out_dir / f"{src.stem}-{k}.jsonl"
            lines = []
            for line in src.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    rec["text"] += f"\n\nReplica {k}."
                    line = json.dumps(rec, ensure_ascii=False)
                except (json.JSONDecodeError, TypeError, KeyError):
                    pass  # malformed lines stay malformed
                lines.append(line)
            dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files.append(dst)
    return files


def plain_loop(files: list[Path], cfg: CurateConfig) -> tuple[int, int]:
    """Curate `files` in one process with plain loops; return (documents read, documents kept)."""
    normalizer = unicode_normalizer()
    filters = heuristic_filters(cfg.min_words, cfg.max_symbol_to_word_ratio)
    seen: set[str] = set()
    read = 0
    for path in files:
        for doc in read_file(path).docs:
            read += 1
            text = clean_whitespace(normalizer.modify_document(doc["text"]))
            if all(f.keep_document(f.score_document(text)) for f in filters):
                seen.add(dedup_key(text))
    return read, len(seen)


def curator_on_ray(files: list[Path], cfg: CurateConfig) -> tuple[int, float]:
    """Curate `files` with the Curator pipeline on a fresh local Ray; return (kept, Ray start seconds)."""
    from nemo_curator.backends.ray_data import RayDataExecutor
    from nemo_curator.tasks import DocumentBatch

    start = time.perf_counter()
    with ray_cluster("", cfg.ray_cpus):
        ray_start = time.perf_counter() - start
        pipeline = build_pipeline(files, cfg.text_field, cfg.id_field, cfg.min_words, cfg.max_symbol_to_word_ratio)
        docs, _, _ = merge_tasks(pipeline.run(executor=RayDataExecutor()))
    kept = ExactDedupStage().process(DocumentBatch(dataset_name="bench", data=docs)).num_items
    return kept, ray_start


def main() -> None:
    """Run both and print documents per second and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="replicas of the shipped corpus")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    cfg = CurateConfig(ray_cpus=args.cpus)

    with tempfile.TemporaryDirectory() as tmp:
        files = replicate_corpus(Path(tmp), args.copies)
        start = time.perf_counter()
        n_docs, kept_loop = plain_loop(files, cfg)
        loop_s = time.perf_counter() - start
        start = time.perf_counter()
        kept_ray, ray_start_s = curator_on_ray(files, cfg)
        ray_s = time.perf_counter() - start

    assert kept_ray == kept_loop, f"pipelines disagree: Curator kept {kept_ray}, loop kept {kept_loop}"
    pipeline_s = ray_s - ray_start_s
    print(f"documents: {n_docs} read, {kept_loop} kept by both")
    print(f"plain loop, 1 process:        {n_docs / loop_s:8.1f} docs/s  ({loop_s:.1f} s)")
    print(f"Curator on Ray ({args.cpus} CPUs), total: {n_docs / ray_s:8.1f} docs/s  ({ray_s:.1f} s, Ray start {ray_start_s:.1f} s)")
    print(f"Curator on Ray, after start:  {n_docs / pipeline_s:8.1f} docs/s  ({pipeline_s:.1f} s)")
    print(f"ratio Curator/loop: {loop_s / ray_s:.2f} total, {loop_s / pipeline_s:.2f} after Ray start")


if __name__ == "__main__":
    main()
