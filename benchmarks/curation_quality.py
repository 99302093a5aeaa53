"""Curation quality on unseen English text: the labelled evaluation corpus of library docstrings.

Runs the real `curate` stage with its default settings on
benchmarks/data/curation_eval.jsonl (built by `python -m curation.eval_corpus`
from sources neither the shipped corpus nor the tests use) and scores it
(`curation.quality_eval`): good-document retention, near- and exact-duplicate
recall, junk removal per kind, PII recall and false redactions. A second run
with `curate.code_aware=false` is the baseline: the same rules judging every
line, code included.

    python benchmarks/curation_quality.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from curation.quality_eval import TARGETS, evaluate
from record import save

SHOWN = ("good_retention", "near_duplicate_recall", "near_duplicate_recall_all", "exact_duplicate_recall",
         "junk_removal", "pii_recall", "pii_false_redactions")


def main() -> None:
    """Evaluate the default settings and the baseline; print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here instead of benchmarks/results/curation_quality.json")
    args = parser.parse_args()
    runs = {"default": [], "code_aware_off": ["curate.code_aware=false"]}
    figures: dict = {"targets": TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            figures[name] = evaluate(Path(tmp) / name, overrides)
    table = Table(title=f"curation quality on {figures['default']['documents']} labelled documents")
    for col in ("figure", "target", *runs):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for key in SHOWN:
        table.add_row(key, str(TARGETS.get(key, "")), *(str(figures[r][key]) for r in runs))
    Console().print(table)
    print("good documents lost (default):", ", ".join(figures["default"]["good_lost"]) or "none")
    save("curation_quality", figures, args.json)


if __name__ == "__main__":
    main()
