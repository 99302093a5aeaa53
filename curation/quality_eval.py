"""Curation quality on the labelled evaluation corpus (`curation.eval_corpus`): what was kept, removed, redacted.

Runs the real `curate` stage (default settings unless overridden) on
`benchmarks/data/curation_eval.jsonl` and scores its output against the labels:

- good_retention: good documents (with or without planted personal data) kept;
- near_duplicate_recall / exact_duplicate_recall: planted copies removed by dedup, of those the filters
  let through to dedup (a copy of a dropped document is usually dropped by the same rule); near
  duplicates are the copies within `NEAR` word 5-gram Jaccard of their original
  (`near_duplicate_recall_all`: every planted copy, heavier edits included);
- junk_removal: junk documents removed (and per junk kind);
- pii_recall: planted personal-data strings absent from the kept documents;
- pii_false_redactions: kept good documents without planted data that were redacted anyway.

    python -m curation.quality_eval [--run-dir DIR] [curate.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from curation.corpus import read_corpus
from curation.eval_corpus import OUT as EVAL_FILE
from curation.eval_corpus import shingles
from curation.pii import PII_KINDS

NEAR = 0.75  # a near-duplicate: word 5-gram Jaccard >= this with its original (the similarity datatrove's
# and FineWeb's MinHash settings target; 14 bands x 8 rows find such a pair with probability >= 0.77, >= 0.99 at 0.85)
TARGETS = {"good_retention": 0.97, "near_duplicate_recall": 0.97, "junk_removal": 0.97, "pii_recall": 0.97}


def read_jsonl(path: Path) -> list[dict]:
    """Return the records of a JSONL file (an absent file has none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def jaccard(a: str, b: str) -> float:
    """Return the Jaccard similarity of two texts' sets of lower-cased word 5-grams."""
    x, y = shingles(a), shingles(b)
    return len(x & y) / max(len(x | y), 1)


def score(records: list[dict], stage_dir: Path) -> dict:
    """Return the quality figures of a curate output directory against the labelled `records`."""
    kept = {d["id"]: d["text"] for d in read_corpus(stage_dir / "corpus")}
    dedup = {r["id"] for name in ("duplicates", "near_duplicates")
             for r in read_jsonl(stage_dir / "rejects" / f"{name}.jsonl")}
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    good = by_label.get("good", []) + by_label.get("good_pii", [])
    junk = [r for label, rs in by_label.items() if label.startswith("junk_") for r in rs]

    text = {r["id"]: r["text"] for r in records}
    similarity = {r["id"]: jaccard(r["text"], text[r["of"]]) for r in by_label.get("near_duplicate", [])}

    def reached(label: str) -> list[dict]:  # planted copies the filters let through to dedup
        return [r for r in by_label.get(label, []) if r["id"] in kept or r["id"] in dedup]

    def share(rs: list[dict], hit) -> float:
        return round(sum(map(hit, rs)) / max(len(rs), 1), 4)

    planted = [(r["id"], s) for r in by_label.get("good_pii", []) if r["id"] in kept for s in r["pii"]]
    markers = tuple(f"<{k.upper()}>" for k in PII_KINDS)
    clean_good = [r for r in by_label.get("good", []) if r["id"] in kept]
    figures = {
        "documents": len(records),
        "good_retention": share(good, lambda r: r["id"] in kept),
        "near_duplicate_recall": share([r for r in reached("near_duplicate") if similarity[r["id"]] >= NEAR],
                                       lambda r: r["id"] in dedup),
        "near_duplicate_recall_all": share(reached("near_duplicate"), lambda r: r["id"] in dedup),
        "exact_duplicate_recall": share(reached("exact_duplicate"), lambda r: r["id"] in dedup),
        "duplicates_reaching_dedup": len(reached("near_duplicate")) + len(reached("exact_duplicate")),
        "junk_removal": share(junk, lambda r: r["id"] not in kept),
        "pii_recall": round(sum(s not in kept[i] for i, s in planted) / max(len(planted), 1), 4),
        "pii_false_redactions": sum(any(m in kept[r["id"]] and m not in r["text"] for m in markers)
                                    for r in clean_good),
        "good_lost": sorted(r["id"] for r in good if r["id"] not in kept),
        "junk_kept": sorted(r["id"] for r in junk if r["id"] in kept),
        "near_duplicates_missed": sorted(r["id"] for r in reached("near_duplicate") if r["id"] not in dedup),
    }
    figures["junk_removal_by_kind"] = {
        label.removeprefix("junk_"): share(rs, lambda r: r["id"] not in kept)
        for label, rs in sorted(by_label.items()) if label.startswith("junk_")
    }
    figures["labels"] = dict(Counter(r["label"] for r in records))
    return figures


def evaluate(run_dir: Path, overrides: list[str] = (), preset: str = "tiny") -> dict:
    """Run the curate stage on the evaluation corpus in `run_dir`; return its quality figures."""
    from pipeline.presets import resolve_configs
    from pipeline.runner import configs_to_json, execute_stage

    configs = resolve_configs(preset, [f"curate.inputs={EVAL_FILE}", "curate.max_docs=0", *overrides])
    execute_stage(str(run_dir), "curate", configs_to_json(configs))
    return score(read_jsonl(EVAL_FILE), Path(run_dir) / "curate")


def main() -> None:
    """Evaluate and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="where the curate stage writes (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="curate.key=value settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = evaluate(Path(args.run_dir or tmp), args.overrides)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
