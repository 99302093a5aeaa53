"""datatrove's version of the standard curate chain, run by `curate_throughput.py` in its own venv.

datatrove 0.10.1 needs numpy>=2 (aigc pins numpy<2 for Triton), so it lives in a
separate virtual environment, never in aigc's:

    python -m venv .venv-datatrove
    .venv-datatrove/bin/pip install datatrove==0.10.1 spacy regex tokenizers "xxhash<4" ftfy orjson

The chain, datatrove's standard MinHash recipe: read JSONL -> ftfy -> Gopher
repetition -> Gopher quality -> C4 -> FineWeb quality (every threshold and the
MinHash parameters from the table in `curation_work.py`, the one aigc's side
reads too) -> write the kept documents + MinHash signatures; buckets; clusters;
re-read the kept documents and drop the clusters' duplicates. Prints one JSON
line: {"seconds", "docs_in", "after_filters": [ids], "final": [ids]}.

`--words whitespace` (the default) gives datatrove's filters whitespace words,
aigc's definition, instead of its spaCy word tokenizer (sentence splitting in
C4 stays spaCy's); the workers are forked so they inherit it.

    .venv-datatrove/bin/python benchmarks/datatrove_chain.py IN_DIR WORK_DIR [--workers 2] [--words whitespace|spacy]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.formatters import FTFYFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from curation_work import datatrove_arguments


def use_whitespace_words() -> None:
    """Make datatrove's Gopher and FineWeb filters split words at whitespace, as aigc does; returns None."""
    import datatrove.pipeline.filters.fineweb_quality_filter as fineweb
    import datatrove.pipeline.filters.gopher_quality_filter as gopher_quality
    import datatrove.pipeline.filters.gopher_repetition_filter as gopher_repetition

    for module in (gopher_quality, gopher_repetition, fineweb):
        module.split_into_words = lambda text, language=None: text.split()


def ids_in(folder: Path) -> list[str]:
    """Return the ids of the documents datatrove wrote under `folder`."""
    ids = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            ids += [json.loads(line)["id"] for line in f]
    return ids


def main() -> None:
    """Run the chain on every .jsonl file of IN_DIR with WORKERS processes; print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir")
    parser.add_argument("work_dir")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--words", choices=("whitespace", "spacy"), default="whitespace")
    args = parser.parse_args()
    work = Path(args.work_dir)
    files = sorted(Path(args.input_dir).glob("*.jsonl"))
    table = datatrove_arguments()
    config = MinhashConfig(**table["MinhashConfig"])
    if args.words == "whitespace":
        use_whitespace_words()
    start = time.perf_counter()
    filters = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(args.input_dir, glob_pattern="*.jsonl"),
            FTFYFormatter(),
            GopherRepetitionFilter(**table["GopherRepetitionFilter"]),
            GopherQualityFilter(**table["GopherQualityFilter"]),
            C4QualityFilter(**table["C4QualityFilter"]),
            FineWebQualityFilter(**table["FineWebQualityFilter"]),
            JsonlWriter(str(work / "filtered")),
            MinhashDedupSignature(output_folder=str(work / "signatures"), config=config),
        ],
        tasks=len(files), workers=args.workers, logging_dir=str(work / "logs" / "filters"), start_method="fork",
    )
    buckets = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
        tasks=config.num_buckets, workers=args.workers, logging_dir=str(work / "logs" / "buckets"), depends=filters,
    )
    clusters = LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=config)],
        tasks=1, logging_dir=str(work / "logs" / "clusters"), depends=buckets,
    )
    dedup = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl.gz"),
            MinhashDedupFilter(str(work / "remove_ids")),
            JsonlWriter(str(work / "final")),
        ],
        tasks=len(files), workers=args.workers, logging_dir=str(work / "logs" / "dedup"), depends=clusters,
    )
    dedup.run()
    seconds = time.perf_counter() - start
    docs_in = sum(1 for f in files for line in open(f, encoding="utf-8") if line.strip())
    print(json.dumps({"seconds": round(seconds, 2), "docs_in": docs_in,
                      "after_filters": ids_in(work / "filtered"), "final": ids_in(work / "final")}))


if __name__ == "__main__":
    main()
